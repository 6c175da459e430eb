"""FP32 pre-training of the DVS128 Gesture 7B-Net (same flags as main_quantize_cbp.py; --quant,
--lr-lambda and --period are ignored).  Cosine learning rate over --epochs.

    python main_train_fp32.py --tb --amp --output-dir ./logs --model SEWResNet --connect_f ADD --epochs 200 --T_train 12 --T 16 --data-path ./datasets/DVS128Gesture --lr 0.1

The best weights are written as a plain state dict to
./trained_params/SEW_ResNet_DVS128Gesture_fp32_pretrained.pth, the file main_quantize_cbp.py loads.
"""

import main_quantize_cbp

from cbp.runtime import run_main


def main(argv=None) -> None:
    main_quantize_cbp.main(argv, fp32=True)


if __name__ == "__main__":
    run_main(main)
