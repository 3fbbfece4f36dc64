"""NVMe over Fabrics, TCP transport: kvtierd's own host for pools on remote namespaces.

* `pdu` -- the PDU formats of the NVMe/TCP transport (encode, and a buffer-directed
  incremental decoder), no sockets;
* `nvme` -- submission/completion queue entries, fabrics and admin commands, status codes;
* `queue` -- the host's per-queue state machine (sans-IO);
* `host` -- the trio transport: controller association, queues, MDTS splitting,
  keep-alive, timeouts, reconnect;
* `device` -- a `BlockDevice` over one namespace, so a pool lives on it unchanged;
* `psk` -- TLS pre-shared keys: the interchange format, the PSK identity and the
  derivations of the retained and TLS PSKs;
* `tls` -- TLS 1.3 with an external PSK (the secure channel), sans-IO, over the system's
  OpenSSL.
"""
