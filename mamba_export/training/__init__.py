"""Training Mamba-1 language models from scratch: ``mamba-export train`` (see docs/training.md).

Modules: :mod:`.loop` (``train(TrainOptions)``, the optimiser, evaluation in bits per byte, checkpoints that resume
exactly), :mod:`.presets` (named model shapes and hyper-parameters), :mod:`.data` (text to ids, held-out split),
:mod:`.init` (state-spaces/mamba's initialisation). This package imports nothing heavy, so the CLI's ``--help``
stays instant; import the submodules.
"""
