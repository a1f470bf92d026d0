"""ncc: a compiler for neural-network compression.

Frontends lower models to one IR (onnx-ir plus ncc's text form, verifier and
node ids), a pass manager runs passes over it, and backends emit artefacts.
Importing ``ncc`` is cheap: heavy modules are imported by the submodules that
need them.
"""

__version__ = "0.1.0"
