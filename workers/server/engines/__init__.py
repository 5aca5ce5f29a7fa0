"""The server's engines, one module per engine: what the server computes for a topology,
without sockets (``handle(identity, message) -> replies``). The topology registry
(:mod:`workers.topologies`) says which engine a config gets."""
