"""Model building blocks: plain torch, each with the reference math spelled out."""
