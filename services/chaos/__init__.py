"""`xds chaos`: chaos experiments against a running pod (scenario file -> faults -> verdict)."""
