"""TSSL-BP neuron (``tsslbp``), its CUDA kernels (``tsslbp_cuda``) and the losses (``loss_f``)."""
