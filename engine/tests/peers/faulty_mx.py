"""A next hop that misbehaves the way real ones do, for delivery fault tests.

Usage: faulty_mx.py PORT MODE COUNT_FILE
MODE:
  banner554   greets with "554 5.7.1 ... blocked" (a blocklisting), then answers QUIT
  ehlo554     greets 220, refuses EHLO and HELO with 554 5.7.1
  close       accepts the connection and closes it at once, saying nothing
  reset_data  a normal session until DATA, then resets the connection (RST) after
              the first bytes of the message
  tarpit      accepts and never says anything (the client's banner timeout decides)
Each accepted connection appends one line to COUNT_FILE (written with O_APPEND, so
the test counts connections by lines). Stops on SIGTERM.
"""
import os
import signal
import socket
import struct
import sys
import threading

port, mode, count_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
MODES = {"banner554", "ehlo554", "close", "reset_data", "tarpit"}
if mode not in MODES:
    sys.exit(f"unknown mode {mode}")


def lines(conn):
    """Yields the client's lines (without CRLF) until it closes."""
    buf = b""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buf += data
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            yield line


def reset(conn):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def serve(conn):
    try:
        if mode == "close":
            conn.close()
            return
        if mode == "tarpit":
            while conn.recv(65536):
                pass
            return
        if mode == "banner554":
            conn.sendall(b"554 5.7.1 mx.faulty.test blocked: your address is listed\r\n")
            for line in lines(conn):
                if line.upper().startswith(b"QUIT"):
                    conn.sendall(b"221 2.0.0 bye\r\n")
                    break
                conn.sendall(b"503 5.5.1 no service\r\n")
            conn.close()
            return
        conn.sendall(b"220 mx.faulty.test ESMTP\r\n")
        in_data = False
        for line in lines(conn):
            if in_data:
                # The first line of the message: reset the connection mid-DATA.
                reset(conn)
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                if mode == "ehlo554":
                    conn.sendall(b"554 5.7.1 mx.faulty.test: access denied\r\n")
                else:
                    conn.sendall(b"250 mx.faulty.test\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 bye\r\n")
                break
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                conn.sendall(b"250 2.0.0 ok\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                in_data = True
            else:
                conn.sendall(b"500 5.5.2 what\r\n")
        conn.close()
    except OSError:
        pass


def main():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = server.accept()
        fd = os.open(count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, b"connection\n")
        os.close(fd)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


main()
