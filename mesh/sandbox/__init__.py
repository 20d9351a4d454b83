"""Sandboxes, endpoints and network drivers: the kernel side of the network model.

`names` says what the agent owns, `netns` makes the named namespaces, `driver`
is the interface every network driver implements, `bridge` the first driver.
All of it is synchronous kernel work (pyroute2, `nft`): the manager runs it in
one worker thread.
"""
