"""Benchmarks (``fastkd bench ...`` or ``python -m fastkd.bench.<name>``); results in bench/results/.

A benchmark is a module with ``main(argv, prog)``: ``compile``, ``kernels``, ``store``, ``dump``,
``train``, ``targets``. Their parts, imported only by them (in this order): ``imagenet`` (the
224 px data config of ``dump`` and ``store``); ``compile_configs`` and ``compile_sass`` (of
``compile``); ``kernel_cases``, then ``kernel_methods`` (of ``kernels``); ``target_errors``, then
``targets_synthetic``, ``targets_pool``, then ``targets_populations`` and ``targets_transfer``
(of ``targets``).
"""
