"""The torch backend: the quantized IR as a PyTorch graph Inductor lowers to int8 kernels (``fx``), and
the check of what Inductor really lowered (``check``). torch is imported only when these run."""
