"""The parallel methods inside a rank: mesh and groups, counted communication, point to point, attention
routing, Ulysses/Ring (USP), PipeFusion, CFG parallel."""
