"""Python's smtplib, an SMTP client nobody on this project wrote, sending to gannetd.

Usage: smtplib_client.py SMTP_PORT SMTPS_PORT USER PASSWORD
Prints a JSON object with the final reply of each transaction.
"""
import json
import smtplib
import ssl
import sys
from email.message import EmailMessage

port, tls_port, user, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE  # gannetd's generated certificate is self-signed
results = {}

# STARTTLS, AUTH (smtplib picks PLAIN), two recipients, an 8-bit UTF-8 body.
with smtplib.SMTP("127.0.0.1", port) as s:
    s.ehlo("py.test")
    s.starttls(context=ctx)
    s.ehlo("py.test")
    s.login(user, password)
    msg = EmailMessage()
    msg["From"] = "py@b.test"
    msg["To"] = "a@d.test, b@d.test"
    msg["Subject"] = "smtplib starttls"
    msg["X-Gannet-Campaign"] = "spring"
    msg.set_content("héllo wörld\n" * 3, cte="8bit")
    s.mail("py@b.test", ["BODY=8BITMIME"])
    for rcpt in ["a@d.test", "b@d.test"]:
        assert s.rcpt(rcpt)[0] == 250
    code, text = s.data(msg.as_bytes().replace(b"\n", b"\r\n"))
    results["starttls"] = [code, text.decode()]

# Implicit TLS (RFC 8314) with an internationalised address (SMTPUTF8).
with smtplib.SMTP_SSL("127.0.0.1", tls_port, context=ctx) as s:
    s.login(user, password)
    s.mail("ü@b.test", ["SMTPUTF8"])
    assert s.rcpt("ö@d.test")[0] == 250
    code, text = s.data("Subject: smtplib utf8\r\n\r\nbody\r\n".encode())
    results["implicit_tls"] = [code, text.decode()]

# No TLS, relaying from loopback, one bad recipient among good ones.
with smtplib.SMTP("127.0.0.1", port) as s:
    refused = s.sendmail("p@b.test", ["ok@d.test", "bad@"], "Subject: smtplib partial\r\n\r\nx\r\n")
    results["partial_refused"] = {k: [v[0], v[1].decode()] for k, v in refused.items()}

# Wrong password.
with smtplib.SMTP("127.0.0.1", port) as s:
    s.starttls(context=ctx)
    try:
        s.login(user, password + "x")
        results["bad_login"] = "accepted"
    except smtplib.SMTPAuthenticationError as e:
        results["bad_login"] = [e.smtp_code, e.smtp_error.decode()]

print(json.dumps(results))
