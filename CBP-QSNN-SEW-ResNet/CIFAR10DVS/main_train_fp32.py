"""FP32 pre-training of the CIFAR10-DVS Wide-7B-Net (same flags as main_quantize_cbp.py;
-quant, -lr_lambda and -period are ignored).  Cosine learning rate over -epochs.

    python main_train_fp32.py -amp -out_dir ./logs -model SEWResNet -cnf ADD -opt SGD -lr 0.1 -epochs 64 -data_dir ./datasets/CIFAR10DVS

The best weights are written as a plain state dict to
./trained_params/SEW_ResNet_CIFAR10DVS_fp32_pretrained.pth, the file main_quantize_cbp.py loads.
"""

import main_quantize_cbp

from cbp.runtime import run_main


def main(argv=None) -> None:
    main_quantize_cbp.main(argv, fp32=True)


if __name__ == "__main__":
    run_main(main)
