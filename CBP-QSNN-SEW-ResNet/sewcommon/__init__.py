"""Code shared by the three SEW-ResNet pipelines (DVS128Gesture/, CIFAR10DVS/, ImageNet/).

``neurons``: spikingjelly ``activation_based`` neuron factories; ``dvsnets``: the 7B-Net family
(``ResNetN``) used by the two DVS datasets; ``imagenet_nets``: the SEW-ResNet-18/34/... family;
``data``: dataset loading; ``engine``: the fp32 / CBP training loop, evaluation, checkpoints,
resume, AMP and distributed set-up.  The scripts put this folder's parent on ``sys.path``.
"""
