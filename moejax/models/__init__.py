"""Models built from the layers and the MoE package: the transformer LM (`transformer`) and
its FLOP and parameter accounting (`flops`)."""
