"""One package per architecture; each registers itself with toolkit.arch when imported."""
