"""Model zoo: CIFAR-style ResNet/PreResNet/WideResNet/VGG (filled in by the models work)."""
