"""The server: the worker on its ROUTER socket, training runs, the reply cache, secure
aggregation, and the engines (one per topology) that compute without sockets."""
