"""Triton functions with no generated constants: the matrix tiles generated ``o3.Linear`` kernels call, and the
species-indexed linear's kernels. This module imports only Triton, so compile worker processes
(:mod:`fastmlip.kernels.precompile`) load it without torch.
"""
import triton
import triton.language as tl


@triton.jit
def tile_product(a, b, PRODUCT: tl.constexpr):
    # PRODUCT "fma" (float64): broadcast products, which every Triton build lowers. Otherwise (float32) tl.dot with
    # that input precision: "ieee" (exact float32 products) or "tf32x3" (tensor cores, about float32 accuracy).
    # (an if/else, not an early return: the compiler builds both sides of an early return)
    if PRODUCT == "fma":
        product = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        product = tl.dot(a, b, input_precision=PRODUCT)
    return product


@triton.jit
def path_tile(inp, weight, nodes, comps, ok, j, DT: tl.constexpr, IN_STRIDE: tl.constexpr, IN_OFF: tl.constexpr,
              D: tl.constexpr, K: tl.constexpr, J: tl.constexpr, W_OFF: tl.constexpr, K_STRIDE: tl.constexpr,
              J_STRIDE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, PRODUCT: tl.constexpr):
    """[BM, BJ]: row r is the pair (nodes[r], comps[r]): sum_k inp[node, IN_OFF + k*D + comp] * W[k, j],
    W[k, j] at W_OFF + k*K_STRIDE + j*J_STRIDE."""
    # The K reduction in BK slices: a [BM, BK] tile of the input times a [BK, BJ] tile of W per slice. The rows are
    # one component of BM nodes, or (stacked) every component of BM / D nodes: then one product covers them all.
    acc = tl.zeros([BM, BJ], DT)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        a = tl.load(inp + nodes[:, None] * IN_STRIDE + IN_OFF + k[None, :] * D + comps[:, None],
                    mask=ok[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(weight + W_OFF + k[:, None] * K_STRIDE + j[None, :] * J_STRIDE,
                    mask=(k[:, None] < K) & (j[None, :] < J), other=0.0)
        acc += tile_product(a, b, PRODUCT)
    return acc


@triton.jit
def weight_grad_tile(x, grad_out, row_start, row_end, k, j, DT: tl.constexpr, X_STRIDE: tl.constexpr,
                     X_OFF: tl.constexpr, G_STRIDE: tl.constexpr, G_OFF: tl.constexpr, D: tl.constexpr,
                     K: tl.constexpr, J: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr,
                     PRODUCT: tl.constexpr):
    """[BK, BJ]: sum over rows in [row_start, row_end) and components of x[row, k, comp] * g[row, j, comp]."""
    # BR rows at a time, every irrep component of them: x^T g accumulates in registers.
    acc = tl.zeros([BK, BJ], DT)
    for r0 in range(row_start, row_end, BR):
        r = r0 + tl.arange(0, BR)
        r_ok = r < row_end
        r = r.to(tl.int64)
        for comp in range(D):
            a = tl.load(x + r[None, :] * X_STRIDE + X_OFF + k[:, None] * D + comp,
                        mask=r_ok[None, :] & (k[:, None] < K), other=0.0)
            b = tl.load(grad_out + r[:, None] * G_STRIDE + G_OFF + j[None, :] * D + comp,
                        mask=r_ok[:, None] & (j[None, :] < J), other=0.0)
            acc += tile_product(a, b, PRODUCT)
    return acc


@triton.jit
def column_sum_tile(grad_out, row_start, row_end, j, DT: tl.constexpr, G_STRIDE: tl.constexpr,
                    G_OFF: tl.constexpr, J: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr):
    """[BJ]: sum over rows in [row_start, row_end) of g[row, G_OFF + j] (a scalar output's bias gradient)."""
    acc = tl.zeros([BJ], DT)
    for r0 in range(row_start, row_end, BR):
        r = r0 + tl.arange(0, BR)
        g = tl.load(grad_out + r.to(tl.int64)[:, None] * G_STRIDE + G_OFF + j[None, :],
                    mask=(r[:, None] < row_end) & (j[None, :] < J), other=0.0)
        acc += tl.sum(g, axis=0)
    return acc


@triton.jit(do_not_specialize=["num_nodes"])  # one variant for every node count (see codegen.jit_header)
def gathered_matmul(inp, weight, coefficients, path, species, order, starts, out, num_nodes, in_off, out_off,
                    w_off, species_start, path_species, stride_k, stride_s, stride_j,
                    K: tl.constexpr, J: tl.constexpr, D: tl.constexpr, IN_STRIDE: tl.constexpr,
                    OUT_STRIDE: tl.constexpr, ACCUMULATE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    BJ: tl.constexpr, PRODUCT: tl.constexpr, DT: tl.constexpr):
    """out[n, out_off + j*D + i] (+)= coef * sum_k inp[n, in_off + k*D + i] * W[k, s_local, j], nodes of a chunk."""
    # Each program owns one chunk of nodes of ONE species (at most BN, in species order) and BJ output channels.
    start = tl.load(starts + tl.program_id(0))
    end = tl.load(starts + tl.program_id(0) + 1)
    rows = start + tl.arange(0, BN)
    row_ok = rows < end
    nodes = tl.load(order + rows, mask=row_ok, other=0).to(tl.int64)
    # The chunk's species, local to this path's species range: outside it, the weight loads are masked to zero.
    local = tl.load(species + tl.minimum(start, num_nodes - 1)) - species_start
    inside = (local >= 0) & (local < path_species)
    k_limit = tl.where(inside, K, 0)
    local = tl.where(inside, local, 0).to(tl.int64)
    coef = tl.load(coefficients + path)
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    j_ok = j < J
    w_base = weight + w_off + local * stride_s
    # Per irrep component: a [BN, BK] tile of the gathered rows times ONE [BK, BJ] weight block, over K.
    for i in tl.static_range(D):
        acc = tl.zeros([BN, BJ], DT)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            a = tl.load(inp + nodes[:, None] * IN_STRIDE + in_off + k[None, :] * D + i,
                        mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
            b = tl.load(w_base + k[:, None] * stride_k + j[None, :] * stride_j,
                        mask=(k[:, None] < k_limit) & j_ok[None, :], other=0.0)
            acc += tile_product(a, b, PRODUCT)
        target = out + nodes[:, None] * OUT_STRIDE + out_off + j[None, :] * D + i
        mask = row_ok[:, None] & j_ok[None, :]
        acc = acc * coef
        # A later path into the same irrep adds to what the earlier ones stored: no atomics.
        if ACCUMULATE:
            acc += tl.load(target, mask=mask, other=0.0)
        tl.store(target, acc, mask=mask)


@triton.jit(do_not_specialize=["num_nodes"])
def weight_gradient(x, grad_out, coefficients, path, species, order, starts, grad_w, num_nodes, in_off, out_off,
                    w_off, species_start, path_species, K: tl.constexpr, J: tl.constexpr, D: tl.constexpr,
                    IN_STRIDE: tl.constexpr, OUT_STRIDE: tl.constexpr, S_STRIDE: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, BJ: tl.constexpr, PRODUCT: tl.constexpr, DT: tl.constexpr):
    """grad_w[k, s, j] += coef * sum over the chunk's nodes and components i of x[n, k, i] grad_out[n, j, i]."""
    # Each program owns one chunk of nodes of ONE species and a [BK, BJ] block of that species' weight gradient.
    start = tl.load(starts + tl.program_id(0))
    end = tl.load(starts + tl.program_id(0) + 1)
    rows = start + tl.arange(0, BN)
    row_ok = rows < end
    nodes = tl.load(order + rows, mask=row_ok, other=0).to(tl.int64)
    local = tl.load(species + tl.minimum(start, num_nodes - 1)) - species_start
    inside = (local >= 0) & (local < path_species) & (start < end)
    k_limit = tl.where(inside, K, 0)
    local = tl.where(inside, local, 0).to(tl.int64)
    coef = tl.load(coefficients + path)
    k = tl.program_id(1) * BK + tl.arange(0, BK)
    j = tl.program_id(2) * BJ + tl.arange(0, BJ)
    # x^T grad_out over the chunk's nodes, per irrep component, summed in registers.
    acc = tl.zeros([BK, BJ], DT)
    for i in tl.static_range(D):
        a = tl.load(x + nodes[None, :] * IN_STRIDE + in_off + k[:, None] * D + i,
                    mask=row_ok[None, :] & (k[:, None] < K), other=0.0)
        b = tl.load(grad_out + nodes[:, None] * OUT_STRIDE + out_off + j[None, :] * D + i,
                    mask=row_ok[:, None] & (j[None, :] < J), other=0.0)
        acc += tile_product(a, b, PRODUCT)
    # Other chunks of the same species add to the same block: one atomic add per element.
    target = grad_w + w_off + k[:, None] * S_STRIDE * J + local * J + j[None, :]
    tl.atomic_add(target, acc * coef, mask=(k[:, None] < k_limit) & (j[None, :] < J))
