"""recon: JAX electron ptychography engine that compiles once per study."""
