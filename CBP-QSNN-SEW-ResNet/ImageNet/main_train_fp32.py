"""FP32 training of SEW-ResNet on ImageNet (same flags as main_quantize_cbp.py; --quant,
--lr_lambda and --period are ignored).  Cosine learning rate with period --cos_lr_T.

    torchrun --nproc_per_node=2 main_train_fp32.py --model sew_resnet18 -b 32 --output-dir ./logs --tb --amp --cache-dataset --connect_f ADD --T 4 --lr 0.1 --epochs 320 --data-path ./datasets/imagenet

The best weights are written as {'model': state_dict} to ./trained_params/sew18_checkpoint_319.pth
(sew34_... for sew_resnet34), the file main_quantize_cbp.py loads.
"""

import main_quantize_cbp

from cbp.runtime import run_main


def main(argv=None) -> None:
    main_quantize_cbp.main(argv, fp32=True)


if __name__ == "__main__":
    run_main(main)
