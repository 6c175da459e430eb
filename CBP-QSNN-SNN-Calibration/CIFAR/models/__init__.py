"""VGG ANN, its spiking and quantized-spiking counterparts, BN folding and calibration."""
