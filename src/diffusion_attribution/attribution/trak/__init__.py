"""TRAK-style attribution (TRAK, D-TRAK, JourneyTRAK): the attributors, their train-side feature store
and the kernel solve."""
