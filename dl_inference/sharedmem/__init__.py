"""Triton's shared-memory extensions: tensors that live in system (POSIX) or CUDA shared memory.

A client on the same host registers a region with the server (``SystemSharedMemoryRegister`` /
``CudaSharedMemoryRegister``, or ``POST v2/{system,cuda}sharedmemory/region/{name}/register``) and then
names it in a tensor's parameters (``shared_memory_region``, ``shared_memory_byte_size``,
``shared_memory_offset``) instead of sending the bytes.

* The gateway owns the registry (:mod:`.registry`): it checks every use against the registered
  region, refuses to unregister a region while a request uses it, and forgets regions whose client
  is gone. It never maps or copies a region's bytes: it appends the regions' locations to the
  request (the reserved request parameter :data:`.params.LOCATIONS`) and forwards it to a local worker.
* The worker (:mod:`.mapping`) maps each region once, reads inputs in place and writes outputs
  straight into the client's output region.
"""
