"""The frozen network and the loss maths: VGG19 layer table, feature extractor, frozen ops, losses, colour."""
