#!/usr/bin/env python3
"""An independent Trustee KBS protocol (v0.4.0) client, for veil's broker tests.

Runs auth -> attest -> resource with a fresh P-256 key, gets simulated evidence from
`veil sim-report` (the simulated firmware as a command), wraps it as Trustee's composite
evidence, binds it with the current runtime-data formula (the hash of the JCS form of
{"tee-pubkey", "nonce", "additional-evidence"}), and decrypts the JWE (ECDH-ES+A256KW, A256GCM)
with the `cryptography` package. Prints a JSON line with the hex of the resource fetched with
the session cookie and with the bearer token.

Over https:// it pins the broker certificate by SHA-256 of its DER and checks that the session
cookie is marked Secure. Over http:// it keeps the session in Python's own cookie jar, which
honours the cookie's attributes the way browsers and most HTTP libraries do: a cookie marked
Secure would never be sent back over plain HTTP.

usage: kbs_client.py BASE_URL CERT_DER|- VEIL_BIN SIM_DIR MEASUREMENT_HEX RESOURCE_PATH
       kbs_client.py report-data NONCE TEE_PUBKEY_JSON HASH_ALG   (prints the report_data hex)
"""
import base64
import hashlib
import http.client
import http.cookiejar
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

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


class PinnedHttps:
    """HTTPS to the broker, authenticated by the SHA-256 pin of its certificate."""

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
                attrs = [a.strip().lower() for a in v.split(";")[1:]]
                if "secure" not in attrs:
                    sys.exit(f"session cookie over TLS is not marked Secure: {v}")
                self.cookie = v.split(";")[0].split("=", 1)[1]
        conn.close()
        return r.status, data

    def has_session(self):
        return self.cookie is not None


class PlainHttp:
    """Plain HTTP with Python's cookie jar, which enforces Secure, Path and the rest."""

    def __init__(self, base):
        self.base = base.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, method, path, body=None, headers=None):
        h = dict(headers or {})
        if body is not None:
            h["Content-Type"] = "application/json"
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(self.base + path, data=data, headers=h, method=method)
        try:
            with self.opener.open(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def has_session(self):
        return any(c.name == "kbs-session-id" for c in self.jar)


def jcs(value):
    # RFC 8785 for objects of strings: sorted members, no whitespace.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def report_data(nonce, tee_pubkey, algo):
    """Trustee's binding of the primary evidence, with no device (additional) evidence."""
    runtime = {"tee-pubkey": tee_pubkey, "nonce": nonce, "additional-evidence": ""}
    return hashlib.new(algo, jcs(runtime)).digest().ljust(64, b"\0")


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
    if len(sys.argv) == 5 and sys.argv[1] == "report-data":
        _, _, nonce, key_json, algo = sys.argv
        print(report_data(nonce, json.loads(key_json), algo).hex())
        return
    base, cert_der, veil, sim_dir, measurement, resource = sys.argv[1:7]
    if base.startswith("https://"):
        kbs = PinnedHttps(base, open(cert_der, "rb").read())
    else:
        kbs = PlainHttp(base)

    status, body = kbs.request("POST", "/kbs/v0/auth", json.dumps(
        {"version": "0.4.0", "tee": "veil-sim",
         "extra-params": {"supported-hash-algorithms": ["sha384"]}}))
    assert status == 200, (status, body)
    challenge = json.loads(body)
    assert kbs.has_session(), "no kbs-session-id cookie kept"

    priv = ec.generate_private_key(ec.SECP256R1())
    nums = priv.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
           "x": b64url(nums.x.to_bytes(32, "big")), "y": b64url(nums.y.to_bytes(32, "big"))}
    algo = challenge.get("extra-params", {}).get("selected-hash-algorithm", "sha384")
    rd = report_data(challenge["nonce"], jwk, algo)

    evidence = json.loads(subprocess.check_output([
        veil, "sim-report", "--dir", sim_dir,
        "--report-data", rd.hex(), "--measurement", measurement]))

    status, body = kbs.request("POST", "/kbs/v0/attest", json.dumps({
        "runtime-data": {"nonce": challenge["nonce"], "tee-pubkey": jwk},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""}}))
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
