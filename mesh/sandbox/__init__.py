"""Sandboxes, endpoints and network drivers: the kernel side of the network model.

`names` says what the agent owns, `netns` makes the named namespaces, `driver`
is the interface every network driver implements, `bridge` the first driver;
`esp` (sans-IO) and `xfrm` compute and install an encrypted overlay's IPsec.
All of it is synchronous kernel work (pyroute2, `nft`): the manager runs it in
one worker thread.
"""
