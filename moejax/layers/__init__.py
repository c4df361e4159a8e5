"""The transformer's layers below the MoE package: activations, RMSNorm, the dense FFN,
residual dropout, document masks, and the attention kinds (grouped-query `attention`,
multi-head latent `mla`)."""
