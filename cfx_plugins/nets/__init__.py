"""Networks used by the metric plugins (FID Inception, ResNet-50s, LPIPS), written for cfx so that they
load the published weight files key for key without torchvision."""
