"""Test support for envoyx: real upstream servers, the real Envoy binary, proxy process
runners, bootstrap builders and small clients.

Everything listens on 127.0.0.1 on ports chosen by the kernel; nothing waits with a
fixed sleep: readiness is polled against a deadline (see :func:`support.wait.until`).
"""
