"""Networks used by the metric plugins (FID Inception, ResNet-50s, LPIPS) and the published classifiers'
networks as ``python:`` factories (DenseNet-121 attribute models, RCSB's ResNet-50), written for cfx so that they
load the published weight files key for key without torchvision."""
