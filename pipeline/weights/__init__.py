"""Reading pretrained weight files, never downloading them: ``midas.py`` (official MiDaS 3.1 checkpoints for
:mod:`dkp_core.midas`: strict key mapping, sha256 for the depth cache's key) and ``vgg.py`` (torchvision's
ImageNet VGG16 for the perceptual loss). Every failure a user can fix is a CheckpointError naming the file and
where to get it."""
