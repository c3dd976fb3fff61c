"""Hopper-only (sm_90a) kernels written in Gluon: warp specialization, TMA, mbarriers, wgmma."""
