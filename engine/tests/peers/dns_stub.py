"""A DNS server for the DANE tests (dnspython), standing in for a validating
resolver: it answers from a zone file and sets the AD bit on answers for the names
it is told are signed, as a validating resolver does once DNSSEC validation
succeeded. It does no DNSSEC itself: the tests check what gannet does with the AD
bit, which is all gannet trusts (as Postfix does).

Usage: dns_stub.py PORT ZONE_FILE [--secure SUFFIX,...] [--servfail NAME,...]

ZONE_FILE is a zone in master-file format with $ORIGIN "." (absolute names).
Answers for names equal to or under a --secure suffix carry AD; --servfail names
get SERVFAIL for every type. Unknown names get NXDOMAIN; known names without the
type get an empty NOERROR. UDP only (answers stay small). Prints "ready" once
listening.
"""

import socket
import sys

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.zone

port, zone_file = int(sys.argv[1]), sys.argv[2]
secure, servfail = [], []
rest = sys.argv[3:]
while rest:
    values = [v for v in rest[1].split(",") if v]
    if rest[0] == "--secure":
        secure = [dns.name.from_text(v) for v in values]
    elif rest[0] == "--servfail":
        servfail = [dns.name.from_text(v) for v in values]
    else:
        sys.exit(f"unknown argument {rest[0]}")
    rest = rest[2:]

zone = dns.zone.from_file(zone_file, origin=dns.name.root, relativize=False, check_origin=False)


def answer(query):
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    response.flags &= ~dns.flags.AD
    question = query.question[0]
    name, rdtype = question.name, question.rdtype
    if any(name == s for s in servfail):
        response.set_rcode(dns.rcode.SERVFAIL)
        return response
    if any(name.is_subdomain(s) for s in secure):
        response.flags |= dns.flags.AD
    node = zone.get_node(name)
    if node is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response
    rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype)
    if rdataset is not None:
        rrset = response.find_rrset(
            response.answer, name, dns.rdataclass.IN, rdtype, create=True
        )
        rrset.update(rdataset)
    return response


def main():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
        except Exception:
            continue
        sock.sendto(answer(query).to_wire(), peer)


if __name__ == "__main__":
    main()
