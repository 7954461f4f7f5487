"""nni_pipebd: Pipe-BD blockwise-distillation NAS for NNI."""
