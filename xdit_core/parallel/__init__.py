"""The parallel methods inside a rank: mesh and groups, counted communication, attention routing, Ulysses/Ring (USP), PipeFusion, CFG parallel."""
