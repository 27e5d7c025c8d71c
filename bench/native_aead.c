/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The BPF AEAD (bpf/include/aead/aead.h) compiled natively: the same source, the same bound
 * checks, the same scratch-in-memory state, only the compiler and ISA differ. What BPF could at
 * best reach on this CPU.
 *
 *   gcc -O2 -DXFP_NATIVE -Ibpf/include bench/native_aead.c -o build/native_aead
 *   build/native_aead [size ...]   ->  "size seal_ns open_ns" per line
 *
 * With -DXFP_WITH_OPENSSL -lcrypto it also times OpenSSL's EVP chacha20-poly1305 the same way
 * (per packet: new nonce, aad, payload, tag), printing "size seal_ns open_ns ossl_seal_ns
 * ossl_open_ns". Before timing it checks RFC 8439 §2.8.2 (seal and open), exits 1 on a mismatch.
 * "open" is verify then decrypt, both always run, as bpf/tests/test_aead.c's XFP_T_OPEN_COST does,
 * so that repeated runs on one buffer cost what a real open costs.
 */
#define XFP_NATIVE 1
#include "aead/aead.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef XFP_WITH_OPENSSL
#include <openssl/evp.h>
#endif

#define OFF 64

static __u8 frame[XFP_MAX_FRAME];

static double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int rfc8439_2_8_2(void)
{
	static const char pt[] = "Ladies and Gentlemen of the class of '99: If I could offer you "
				 "only one tip for the future, sunscreen would be it.";
	static const __u8 tag[16] = {0x1a, 0xe1, 0x0b, 0x59, 0x4f, 0x09, 0xe2, 0x6a,
				     0x7e, 0x90, 0x2e, 0xcb, 0xd0, 0x60, 0x06, 0x91};
	static const __u8 aad[12] = {0x50, 0x51, 0x52, 0x53, 0xc0, 0xc1,
				     0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7};
	static const __u8 iv[8] = {0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47};
	struct xfp_aead_key k = {.salt = {7, 0, 0, 0}};
	__u32 n = sizeof(pt) - 1;
	struct xdp_md ctx = {frame, frame + OFF + n + 16};

	for (int i = 0; i < 32; i++)
		k.key[i] = 0x80 + i;
	memcpy(frame + OFF, pt, n);
	if (xfp_aead_seal(&ctx, OFF, n, OFF + n, &k, iv, aad, 12) ||
	    memcmp(frame + OFF + n, tag, 16)) {
		fprintf(stderr, "native seal does not give the RFC 8439 2.8.2 tag\n");
		return 1;
	}
	if (xfp_aead_verify(&ctx, OFF, n, OFF + n, &k, iv, aad, 12) ||
	    xfp_aead_decrypt(&ctx, OFF, n, &k, iv) || memcmp(frame + OFF, pt, n)) {
		fprintf(stderr, "native open does not give back the RFC 8439 2.8.2 plaintext\n");
		return 1;
	}
	return 0;
}

#ifdef XFP_WITH_OPENSSL
static EVP_CIPHER_CTX *ossl_enc, *ossl_dec;
static __u8 ossl_out[XFP_MAX_FRAME];

/* One packet's seal through EVP, as a per-packet user (the kernel, an IKE daemon) does it. */
static int ossl_seal(const __u8 *nonce, const __u8 *aad, const __u8 *in, int n, __u8 *tag)
{
	int l;

	return !EVP_EncryptInit_ex(ossl_enc, NULL, NULL, NULL, nonce) ||
	       !EVP_EncryptUpdate(ossl_enc, NULL, &l, aad, 8) ||
	       !EVP_EncryptUpdate(ossl_enc, ossl_out, &l, in, n) ||
	       !EVP_EncryptFinal_ex(ossl_enc, ossl_out + l, &l) ||
	       !EVP_CIPHER_CTX_ctrl(ossl_enc, EVP_CTRL_AEAD_GET_TAG, 16, tag);
}

static int ossl_open(const __u8 *nonce, const __u8 *aad, const __u8 *in, int n, __u8 *tag)
{
	int l;

	return !EVP_DecryptInit_ex(ossl_dec, NULL, NULL, NULL, nonce) ||
	       !EVP_DecryptUpdate(ossl_dec, NULL, &l, aad, 8) ||
	       !EVP_DecryptUpdate(ossl_dec, ossl_out, &l, in, n) ||
	       !EVP_CIPHER_CTX_ctrl(ossl_dec, EVP_CTRL_AEAD_SET_TAG, 16, tag) ||
	       EVP_DecryptFinal_ex(ossl_dec, ossl_out + l, &l) <= 0;
}
#endif

int main(int argc, char **argv)
{
	static const __u32 def_sizes[] = {64, 256, 512, 1024, 1400};
	static const __u8 iv[8] = {1, 2, 3, 4, 5, 6, 7, 8};
	static const __u8 aad[8] = {0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1};
	struct xfp_aead_key k;
	int nsizes = argc > 1 ? argc - 1 : 5;
	volatile int sink = 0;

	if (rfc8439_2_8_2())
		return 1;
	for (int i = 0; i < 32; i++)
		k.key[i] = i * 7 + 1;
	memset(k.salt, 0xa5, sizeof(k.salt));
#ifdef XFP_WITH_OPENSSL
	ossl_enc = EVP_CIPHER_CTX_new();
	ossl_dec = EVP_CIPHER_CTX_new();
	if (!ossl_enc || !ossl_dec ||
	    !EVP_EncryptInit_ex(ossl_enc, EVP_chacha20_poly1305(), NULL, k.key, NULL) ||
	    !EVP_DecryptInit_ex(ossl_dec, EVP_chacha20_poly1305(), NULL, k.key, NULL)) {
		fprintf(stderr, "OpenSSL has no chacha20-poly1305\n");
		return 1;
	}
#endif
	for (int si = 0; si < nsizes; si++) {
		__u32 n = argc > 1 ? (__u32)atoi(argv[si + 1]) : def_sizes[si];
		struct xdp_md ctx = {frame, frame + OFF + n + 16};
		double t0, seal_ns, open_ns;
		long iters;

		if (OFF + n + 16 > XFP_MAX_FRAME) {
			fprintf(stderr, "size %u exceeds XFP_MAX_FRAME\n", n);
			return 1;
		}
		for (__u32 i = 0; i < n; i++)
			frame[OFF + i] = (__u8)i;
		/* Batches of ~1 ms, the fastest of 200 kept: the host is shared (2 vCPUs, other
		 * jobs), and the minimum is the cost without interference. */
		t0 = now_ns();
		for (int i = 0; i < 100; i++)
			sink += xfp_aead_seal(&ctx, OFF, n, OFF + n, &k, iv, aad, 8);
		iters = (long)(1e6 / ((now_ns() - t0) / 100)) + 1;
		seal_ns = open_ns = 1e18;
		for (int batch = 0; batch < 200; batch++) {
			double t;

			t0 = now_ns();
			for (long i = 0; i < iters; i++)
				sink += xfp_aead_seal(&ctx, OFF, n, OFF + n, &k, iv, aad, 8);
			t = (now_ns() - t0) / iters;
			seal_ns = t < seal_ns ? t : seal_ns;

			t0 = now_ns();
			for (long i = 0; i < iters; i++) {
				sink += xfp_aead_verify(&ctx, OFF, n, OFF + n, &k, iv, aad, 8);
				sink += xfp_aead_decrypt(&ctx, OFF, n, &k, iv);
			}
			t = (now_ns() - t0) / iters;
			open_ns = t < open_ns ? t : open_ns;
		}
#ifdef XFP_WITH_OPENSSL
		{
			__u8 nonce[12], tag[16];
			double o_seal = 1e18, o_open = 1e18;

			memcpy(nonce, k.salt, 4);
			memcpy(nonce + 4, iv, 8);
			if (ossl_seal(nonce, aad, frame + OFF, n, tag) ||
			    ossl_open(nonce, aad, ossl_out, n, tag)) {
				fprintf(stderr, "OpenSSL seal/open failed at %u bytes\n", n);
				return 1;
			}
			/* open what seal made: ossl_out holds the ciphertext of frame + OFF */
			memcpy(frame + OFF, ossl_out, n);
			for (int batch = 0; batch < 200; batch++) {
				double t;

				t0 = now_ns();
				for (long i = 0; i < iters; i++)
					sink += ossl_seal(nonce, aad, frame + OFF, n, tag);
				t = (now_ns() - t0) / iters;
				o_seal = t < o_seal ? t : o_seal;
				t0 = now_ns();
				for (long i = 0; i < iters; i++)
					sink += ossl_open(nonce, aad, frame + OFF, n, tag);
				t = (now_ns() - t0) / iters;
				o_open = t < o_open ? t : o_open;
			}
			printf("%u %.1f %.1f %.1f %.1f\n", n, seal_ns, open_ns, o_seal, o_open);
		}
#else
		printf("%u %.1f %.1f\n", n, seal_ns, open_ns);
#endif
	}
	return sink == 0x7fffffff; /* keeps the results alive */
}
