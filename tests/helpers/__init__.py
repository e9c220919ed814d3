"""What tests of several layers share: model builders (:mod:`.mace_models`) and the comparison of an op with its
reference to second order (:mod:`.derivatives`). ``tests/`` is on ``sys.path`` (setup.cfg's ``pythonpath``)."""
