"""Deployment truth: the speed-up that survives export, on the runtime the user ships.

Four small modules, one idea each:

* `export`    a pruned model (masked or physically smaller) to ONNX, TorchScript and ``.pt2``; the
              file reloaded and its outputs compared with PyTorch's (max abs difference), its size
              and deflate-compressed size;
* `runtimes`  dense vs pruned on eager PyTorch, ``torch.compile`` and ONNX Runtime, with the paired
              timing and intervals of `explorer.timing`, measured / FLOPs per runtime;
* `sparse`    CSR kernels for Linear layers on the CPU: break-even sparsity per layer shape, and a
              pruned model deployed with them where they win;
* `quantize`  dynamic int8 of a pruned model: size, latency and task metric next to fp32.

`source` finds the dense and pruned pair for a model file or a stored run (``run:ID``).
"""
