"""Resource-provider handlers: Microsoft.Resources, .Storage, .Network, .Compute."""
