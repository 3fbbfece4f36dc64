"""kvtier.daemon: kvtierd -- the storage engine and the trio service around it.

The engine: block devices (`blockdev`, `iovec`; `nvmf` for NVMe-oF/TCP namespaces), the
on-disk structures (`superblock`, `segment`, `record`, `checkpoint`; docs/FORMAT.md), the
index and the log-structured pool (`index`; `pool`, the facade over its parts: `segtable`,
`catalog`, `pool_writer`, `pool_reader`, `pool_cleaner`, `pool_checkpoint`,
`pool_recovery`, sharing `pool_context`, `pool_inflight`, `pool_types`; `pool_open` opens
the configured one).  The service: configuration
(`config`), the DRAM tiers in front of the media pool (`tiers`), each connected client
and the main loop (`service`; docs/PROTOCOL.md), I/O classes (`iosched`, `cpuprio`),
per-tenant limits (`qos`), the DRAM policy and its statistics (`policy`, `reuse`),
prefetch hints (`prefetch`), metrics, the audit log, SPDK provisioning (`spdk`) and the
`kvtierd` command line (`main`).
"""
