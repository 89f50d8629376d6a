#!/usr/bin/env python3
"""Mint RS256 JWTs for the gateway benchmark, and generate the keypair + JWKS.

One token works for every gateway in the bench (Envoy and Portcullis check the same
issuer, audience and JWKS; the tenant is in the "tenant" claim).

Usage:
  mint.py genkeys [--keys DIR]         # writes DIR/private.pem, public.pem, jwks.json and
                                       # context.key (Portcullis context-signing key, 32 bytes hex)
  mint.py [--tenant acme] [--plan pro] [--org acme-org] [--sub user-1] [--ttl 86400]
          [--iss https://issuer.bench.local] [--aud llm-gateway] [--bad-sig] [--expired]
          [--keys DIR]                 # prints one token on stdout
  mint.py many N [--tenant ...]        # prints N distinct tokens (different sub/jti), one per line
  mint.py mix N --tenants T            # N tokens spread over tenants t00..t(T-1), one per line

DIR defaults to $BENCH_KEYS (lib.sh sets it to <scratch>/keys). Keys never go into the repo:
genkeys refuses a directory inside the bench folder.
Needs PyJWT + cryptography (setup.sh installs them in <scratch>/venv).
"""
import argparse, base64, json, os, secrets, sys, time, uuid

import jwt  # PyJWT
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

HERE = os.path.dirname(os.path.abspath(__file__))
KID = "bench-rs256-1"
ISS = "https://issuer.bench.local"
AUD = "llm-gateway"
TENANT_CLAIM = "tenant"  # gateway.toml [auth.jwt] tenant_claim; Envoy claim_to_headers


def b64u(n: int) -> str:
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def write(path, data: bytes, mode=0o644):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def genkeys(keys):
    real = os.path.realpath(keys)
    if real == HERE or real.startswith(HERE + os.sep):
        sys.exit(f"refusing to write keys inside the bench folder ({keys}); use the scratch dir")
    os.makedirs(keys, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write(os.path.join(keys, "private.pem"),
          key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()), 0o600)
    pub = key.public_key()
    write(os.path.join(keys, "public.pem"),
          pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    nums = pub.public_numbers()
    jwks = {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": KID,
                      "n": b64u(nums.n), "e": b64u(nums.e)}]}
    write(os.path.join(keys, "jwks.json"), json.dumps(jwks, indent=1).encode())
    write(os.path.join(keys, "context.key"), (secrets.token_hex(32) + "\n").encode(), 0o600)
    print("wrote", keys)


def mint(a, sub=None, jti=None):
    now = int(time.time())
    claims = {"iss": a.iss, "aud": a.aud, "sub": sub or a.sub,
              TENANT_CLAIM: a.tenant, "plan": a.plan, "org": a.org,  # plan/org: Envoy only
              "scope": "inference:write",  # the shipped Rego policy requires it
              "iat": now, "nbf": now - 5,
              "exp": (now - 3600) if a.expired else (now + a.ttl),
              "jti": jti or str(uuid.uuid4())}
    if a.bad_sig:  # signed by a throwaway key with the same kid -> signature check must fail
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = signing_key(a.keys)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


_KEYS = {}


def signing_key(keys):
    """The private key, loaded once however many tokens are minted."""
    if keys not in _KEYS:
        with open(os.path.join(keys, "private.pem"), "rb") as f:
            _KEYS[keys] = serialization.load_pem_private_key(f.read(), None)
    return _KEYS[keys]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", nargs="?", default="one", choices=["one", "many", "mix", "genkeys"])
    p.add_argument("n", nargs="?", type=int, default=1)
    p.add_argument("--keys", default=os.environ.get("BENCH_KEYS"),
                   help="key directory (default: $BENCH_KEYS)")
    p.add_argument("--tenant", default="acme")
    p.add_argument("--plan", default="pro")
    p.add_argument("--org", default="acme-org")
    p.add_argument("--sub", default="user-1")
    p.add_argument("--ttl", type=int, default=86400)
    p.add_argument("--iss", default=ISS)
    p.add_argument("--aud", default=AUD)
    p.add_argument("--tenants", type=int, default=50, help="mix: how many tenants")
    p.add_argument("--bad-sig", action="store_true")
    p.add_argument("--expired", action="store_true")
    a = p.parse_args()
    if not a.keys:
        p.error("no key directory: pass --keys DIR or set BENCH_KEYS (lib.sh does)")
    if a.cmd == "genkeys":
        return genkeys(a.keys)
    if a.cmd == "mix":
        for i in range(a.n):
            a.tenant = f"t{i % a.tenants:02d}"
            a.org = f"{a.tenant}-org"
            print(mint(a, sub=f"user-{i}"))
        return
    if a.cmd == "many":
        for i in range(a.n):
            print(mint(a, sub=f"user-{i}"))
    else:
        print(mint(a))


if __name__ == "__main__":
    main()
