#!/usr/bin/env python3
"""An independent Trustee KBS protocol (v0.4.0) client, for veil's broker tests.

Speaks HTTPS to the broker, pinning its certificate by SHA-256 of the DER, runs
auth -> attest -> resource with a fresh P-256 key, gets simulated evidence from
`veil sim-report` (the simulated firmware as a command), and decrypts the JWE
(ECDH-ES+A256KW, A256GCM) with the `cryptography` package. Prints a JSON line
with the hex of the resource fetched with the session cookie and with the
bearer token.

usage: kbs_client.py BASE_URL CERT_DER VEIL_BIN SIM_DIR MEASUREMENT_HEX RESOURCE_PATH
"""
import base64
import hashlib
import http.client
import json
import ssl
import subprocess
import sys
import urllib.parse

try:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
except ImportError as e:  # say what is missing, never skip
    sys.exit(f"missing Python package 'cryptography' ({e}); pip install cryptography")


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def unb64url(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class Kbs:
    def __init__(self, base, pinned_der):
        u = urllib.parse.urlsplit(base)
        self.host, self.port = u.hostname, u.port
        self.pin = hashlib.sha256(pinned_der).hexdigest()
        self.cookie = None

    def request(self, method, path, body=None, headers=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # authenticated by the pin below instead
        conn = http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=30)
        conn.connect()
        got = hashlib.sha256(conn.sock.getpeercert(binary_form=True)).hexdigest()
        if got != self.pin:
            sys.exit(f"broker certificate {got} is not the pinned one {self.pin}")
        h = dict(headers or {})
        if self.cookie and "Authorization" not in h:
            h["Cookie"] = f"kbs-session-id={self.cookie}"
        if body is not None:
            h["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        for k, v in r.getheaders():
            if k.lower() == "set-cookie" and v.startswith("kbs-session-id="):
                self.cookie = v.split(";")[0].split("=", 1)[1]
        conn.close()
        return r.status, data


def jcs(value):
    # RFC 8785 for objects of strings: sorted members, no whitespace.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def decrypt(priv, jwe):
    header = json.loads(unb64url(jwe["protected"]))
    assert header["alg"] == "ECDH-ES+A256KW" and header["enc"] == "A256GCM", header
    epk = ec.EllipticCurvePublicNumbers(
        int.from_bytes(unb64url(header["epk"]["x"]), "big"),
        int.from_bytes(unb64url(header["epk"]["y"]), "big"),
        ec.SECP256R1(),
    ).public_key()
    z = priv.exchange(ec.ECDH(), epk)
    alg = b"ECDH-ES+A256KW"
    other = len(alg).to_bytes(4, "big") + alg + (0).to_bytes(4, "big") * 2 + (256).to_bytes(4, "big")
    kek = ConcatKDFHash(algorithm=hashes.SHA256(), length=32, otherinfo=other).derive(z)
    cek = aes_key_unwrap(kek, unb64url(jwe["encrypted_key"]))
    ct = unb64url(jwe["ciphertext"]) + unb64url(jwe["tag"])
    return AESGCM(cek).decrypt(unb64url(jwe["iv"]), ct, jwe["protected"].encode())


def main():
    base, cert_der, veil, sim_dir, measurement, resource = sys.argv[1:7]
    kbs = Kbs(base, open(cert_der, "rb").read())

    status, body = kbs.request("POST", "/kbs/v0/auth", json.dumps(
        {"version": "0.4.0", "tee": "veil-sim",
         "extra-params": {"supported-hash-algorithms": ["sha384"]}}))
    assert status == 200, (status, body)
    challenge = json.loads(body)
    assert kbs.cookie, "no kbs-session-id cookie"

    priv = ec.generate_private_key(ec.SECP256R1())
    nums = priv.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
           "x": b64url(nums.x.to_bytes(32, "big")), "y": b64url(nums.y.to_bytes(32, "big"))}
    runtime_data = {"nonce": challenge["nonce"], "tee-pubkey": jwk}
    algo = challenge.get("extra-params", {}).get("selected-hash-algorithm", "sha384")
    report_data = hashlib.new(algo, jcs(runtime_data)).digest().ljust(64, b"\0")

    evidence = json.loads(subprocess.check_output([
        veil, "sim-report", "--dir", sim_dir,
        "--report-data", report_data.hex(), "--measurement", measurement]))

    status, body = kbs.request("POST", "/kbs/v0/attest", json.dumps(
        {"runtime-data": runtime_data, "tee-evidence": evidence}))
    assert status == 200, (status, body)
    token = json.loads(body)["token"]

    status, body = kbs.request("GET", f"/kbs/v0/resource/{resource}")
    assert status == 200, (status, body)
    by_cookie = decrypt(priv, json.loads(body))

    status, body = kbs.request("GET", f"/kbs/v0/resource/{resource}",
                               headers={"Authorization": f"Bearer {token}"})
    assert status == 200, (status, body)
    by_bearer = decrypt(priv, json.loads(body))

    print(json.dumps({"cookie": by_cookie.hex(), "bearer": by_bearer.hex()}))


if __name__ == "__main__":
    main()
