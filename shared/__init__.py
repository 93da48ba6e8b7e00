"""Code shared by the control plane (``services``) and the workers (``workers``)."""
