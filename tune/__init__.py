"""Accuracy-aware tuning: ``ncc compile ... --eval eval.py:evaluate --max-loss 1%``.

The user's function scores a candidate model (higher is better unless ``--lower-is-better``); the tuner
searches ``int8`` configurations for the fastest one whose loss against FP32 stays within the bound:

- :mod:`~ncc.tune.space`: a configuration (calibration method, smooth-quant alpha, weight granularity,
  bias correction, the node ids kept in float) and the pipeline it stands for;
- :mod:`~ncc.tune.trials`: one trial, a pure function of (model, pipeline spec) -> metric, run here, in
  worker processes or on Ray;
- :mod:`~ncc.tune.log`: the JSON-lines log every evaluated configuration is appended to (``--resume``);
- :mod:`~ncc.tune.search`: the strategies (``ranked``: cost-free moves screened on calibration data, then
  a bisection over the nodes ranked by measured fallback gain, then giving back float nodes that are not
  needed; ``basic``: one node at a time, as Intel Neural Compressor's basic strategy).
"""
