"""An SMTP server nobody on this project wrote (aiosmtpd), for delivery tests.

Usage: aiosmtpd_sink.py PORT OUT_DIR [--tls CERT KEY] [--sni DIR] [--broken-tls CERT KEY]
                        [--auth USER PASSWORD] [--auth-mechs LOGIN,...] [--proxy-protocol] [--timeout SECS]
                        [--data-latency SECS]
Stores each message as OUT_DIR/<n>.json ({"mail_from", "rcpt_tos", "mail_options",
"data" (latin-1), "tls", "peer" (client address), "peer_port", "helo", "auth_user",
"proxy_src", "proxy_dst", "received_at" (unix seconds, when its DATA ended)}), and
OUT_DIR/connections.state: {"open", "max_open", "total", "sessions", "max_sessions"}
(connections open now, the most open at once, all made; SMTP sessions — from the
first EHLO or HELO to QUIT or the connection's end — now and the most at once, which
leaves out the instant between a client's QUIT and the close of its socket, when
its next connection may already be accepted), rewritten as they change.
--broken-tls offers STARTTLS whose handshake fails (TLS 1.1 at most, which a
modern client refuses). --proxy-protocol: every connection starts with a PROXY
header (HAProxy's, v1 or v2), whose addresses are stored. --sni: a client naming server N in its TLS handshake gets
DIR/N.crt and DIR/N.key when they exist. --auth: AUTH is offered (over TLS) and required for mail,
with these credentials; --auth-mechs: only these mechanisms are offered. --data-latency:
the reply to each end of data comes SECS late (a slow server). --timeout:
an idle session gets 421 and is closed after SECS (aiosmtpd's default: 300). Recipients whose local part is `tempfail` get 451 and
`permfail` get 550 at RCPT; `throttled` and `blocked` get a provider's rate-limit
(451 4.7.28) and block (554 5.7.1 [TSS04]) replies. Prints "ready" once listening; stops on SIGTERM.
"""
import asyncio
import json
import os
import signal
import ssl
import sys
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult


class Handler:
    def __init__(self, out_dir, data_latency=0.0):
        self.out_dir = out_dir
        self.data_latency = data_latency
        self.count = 0
        self.connections = {"open": 0, "max_open": 0, "total": 0, "sessions": 0, "max_sessions": 0}

    def connection_changed(self, opened):
        c = self.connections
        if opened:
            c["open"] += 1
            c["total"] += 1
            c["max_open"] = max(c["max_open"], c["open"])
        else:
            c["open"] -= 1
        self.write_counts()

    def session_changed(self, opened):
        c = self.connections
        if opened:
            c["sessions"] += 1
            c["max_sessions"] = max(c["max_sessions"], c["sessions"])
        else:
            c["sessions"] -= 1
        self.write_counts()

    def write_counts(self):
        c = self.connections
        path = os.path.join(self.out_dir, "connections.state")
        with open(path + ".tmp", "w") as f:
            json.dump(c, f)
        os.rename(path + ".tmp", path)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0]
        if local == "tempfail":
            return "451 4.2.0 mailbox busy, try later"
        if local == "permfail":
            return "550 5.1.1 no such user"
        # Provider-style replies for the response-rule tests.
        if local == "throttled":
            return "451 4.7.28 Our system has detected an unusual rate of unsolicited mail"
        if local == "blocked":
            return "554 5.7.1 [TSS04] Messages from this source are blocked"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_PROXY(self, server, session, envelope, proxy_data):
        return True

    async def handle_DATA(self, server, session, envelope):
        if self.data_latency:
            await asyncio.sleep(self.data_latency)
        self.count += 1
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "mail_options": envelope.mail_options,
            "data": envelope.original_content.decode("latin-1"),
            "tls": session.ssl is not None,
            "peer": session.peer[0],
            "peer_port": session.peer[1],
            "helo": session.host_name,
            "auth_user": session.auth_data.login.decode() if session.authenticated else None,
            "received_at": time.time(),
        }
        proxy = session.proxy_data
        if proxy is not None and proxy.src_addr is not None:
            record["proxy_src"] = str(proxy.src_addr)
            record["proxy_dst"] = f"{proxy.dst_addr}:{proxy.dst_port}"
        path = os.path.join(self.out_dir, f"{self.count}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(path + ".tmp", path)
        return "250 2.0.0 stored"


class CountingSMTP(SMTP):
    """aiosmtpd's server, telling the handler when a connection opens and closes, and
    when its SMTP session starts (EHLO or HELO) and ends (QUIT, or the close)."""

    in_session = False

    def connection_made(self, transport):
        super().connection_made(transport)
        self.event_handler.connection_changed(True)

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self.mark_session(False)
        self.event_handler.connection_changed(False)

    def mark_session(self, started):
        if self.in_session != started:
            self.in_session = started
            self.event_handler.session_changed(started)

    async def smtp_EHLO(self, arg):
        self.mark_session(True)
        await super().smtp_EHLO(arg)

    async def smtp_HELO(self, arg):
        self.mark_session(True)
        await super().smtp_HELO(arg)

    async def smtp_QUIT(self, arg):
        self.mark_session(False)
        await super().smtp_QUIT(arg)


class CountingController(Controller):
    def factory(self):
        return CountingSMTP(self.handler, **self.SMTP_kwargs)


def authenticator_for(user, password):
    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login == user.encode() and auth_data.password == password.encode()
        # handled=False: aiosmtpd then answers a refusal itself (535 5.7.8).
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    return authenticate


def main():
    port, out_dir = int(sys.argv[1]), sys.argv[2]
    tls_context = None
    timeout = 300
    data_latency = 0.0
    auth = {}
    rest = sys.argv[3:]
    while rest:
        if rest[0] == "--tls":
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_context.load_cert_chain(rest[1], rest[2])
            rest = rest[3:]
        elif rest[0] == "--sni":
            sni_dir = rest[1]

            def pick(sock, name, _context, sni_dir=sni_dir):
                if name:
                    crt = os.path.join(sni_dir, name + ".crt")
                    key = os.path.join(sni_dir, name + ".key")
                    if os.path.isfile(crt):
                        own = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                        own.load_cert_chain(crt, key)
                        sock.context = own

            tls_context.sni_callback = pick
            rest = rest[2:]
        elif rest[0] == "--broken-tls":
            tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls_context.set_ciphers("DEFAULT:@SECLEVEL=0")
            tls_context.maximum_version = ssl.TLSVersion.TLSv1_1
            tls_context.load_cert_chain(rest[1], rest[2])
            rest = rest[3:]
        elif rest[0] == "--auth":
            auth["authenticator"] = authenticator_for(rest[1], rest[2])
            auth["auth_required"] = True
            auth["auth_require_tls"] = True
            rest = rest[3:]
        elif rest[0] == "--proxy-protocol":
            auth["proxy_protocol_timeout"] = 5
            rest = rest[1:]
        elif rest[0] == "--auth-mechs":
            offered = set(rest[1].upper().split(","))
            auth["auth_exclude_mechanism"] = [m for m in ("PLAIN", "LOGIN") if m not in offered]
            rest = rest[2:]
        elif rest[0] == "--data-latency":
            data_latency = float(rest[1])
            rest = rest[2:]
        elif rest[0] == "--timeout":
            timeout = float(rest[1])
            rest = rest[2:]
        else:
            sys.exit(f"unknown argument {rest[0]}")
    handler = Handler(out_dir, data_latency)
    controller = CountingController(
        handler,
        hostname="127.0.0.1",
        port=port,
        tls_context=tls_context,
        require_starttls=False,
        enable_SMTPUTF8=True,
        decode_data=False,
        server_hostname="sink.test",
        timeout=timeout,
        **auth,
    )
    controller.start()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.run_until_complete(stop.wait())
    controller.stop()


if __name__ == "__main__":
    main()
