// SPDX-License-Identifier: GPL-2.0-only
/*
 * xfp_crypto: ESP AEAD for XDP and TC programs, with the kernel's own SIMD code.
 *
 * BPF has neither SIMD nor AES instructions, so a BPF ChaCha20-Poly1305 costs ~16x what the
 * kernel's AVX2 code costs, and AES-GCM cannot be done in BPF at all. This module keeps per-SA
 * keys (contexts, made and destroyed by id through ioctls on /dev/xfp_crypto) and registers
 * kfuncs that seal or open one ESP payload in place:
 *
 *   int xfp_kc_xdp_seal(struct xdp_md *ctx, u32 id, u32 esp_off, u32 len, u32 seq_hi);
 *   int xfp_kc_xdp_open(...);  xfp_kc_skb_seal(struct __sk_buff *ctx, ...);  xfp_kc_skb_open(...)
 *
 * returning enum xfp_kc_ret (bpf/include/kcrypto_defs.h, which also gives the packet layout).
 * The kfuncs take the program's context, so they check esp_off and len against the buffer's
 * real end themselves (kernel/bpf/btf.c, btf_get_prog_ctx_type(): a kfunc argument named
 * struct xdp_md / struct __sk_buff is the program's context, struct xdp_buff / struct sk_buff
 * at run time).
 *
 * ChaCha20-Poly1305 (RFC 7634, the AEAD of RFC 8439 section 2.8) runs on the arch library
 * (arch/x86/crypto/chacha_glue.c, poly1305_glue.c): synchronous, AVX2/AVX-512 when the FPU is
 * usable. AES-GCM (RFC 4106) runs on aesni-intel's internal synchronous AEAD
 * "__rfc4106(gcm(aes))" (arch/x86/crypto/aesni-intel_glue.c), which is valid only while
 * crypto_simd_usable(); its requests are allocated per CPU when the context is made, so nothing
 * is allocated on the packet path. When the FPU is not usable, both return XFP_KCR_NO_SIMD and
 * the program gives the packet to the kernel.
 *
 * Lifetime: contexts are RCU-protected pointers in a table indexed by id; destroy unpublishes,
 * waits for an RCU grace period (BPF programs run inside RCU read-side sections), then zeroizes
 * and frees. A loaded program that calls a kfunc holds a reference on this module
 * (kernel/bpf/verifier.c, __find_kfunc_desc_btf(): btf_try_get_module()), so rmmod is refused
 * with EBUSY while one exists; so is it while /dev/xfp_crypto is open. Contexts left at unload
 * are zeroized and freed.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/bpf.h>
#include <linux/btf.h>
#include <linux/btf_ids.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/scatterlist.h>
#include <linux/skbuff.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <net/xdp.h>
#include <asm/simd.h> /* before crypto/internal/simd.h in 6.1 */
#include <crypto/aead.h>
#include <crypto/algapi.h>
#include <crypto/chacha.h>
#include <crypto/internal/simd.h>
#include <crypto/poly1305.h>
#include <asm/unaligned.h>

#include "kcrypto_defs.h"

#define XFP_KC_SALT_LEN 4
#define XFP_KC_IV_LEN 8
#define XFP_KC_AAD_MAX 12 /* SPI || seq_hi || seq_lo */
#define XFP_KC_CHACHA_KEY_LEN 32
#define XFP_KC_CHACHA_KEY_WORDS (XFP_KC_CHACHA_KEY_LEN / 4)
#define XFP_KC_GCM_AAD_IV_MAX (XFP_KC_AAD_MAX + XFP_KC_IV_LEN)

/* One CPU's AES-GCM request: the crypto API's rfc4106 wants the AAD followed by the IV in the
 * associated data (crypto/gcm.c, crypto_rfc4106_crypt(); aesni's helper_rfc4106_encrypt()
 * accepts assoclen 16 or 20). The AAD and IV are copied here, so sg[0] is linear (aesni then
 * allocates nothing: gcmaes_crypt_by_sg()), and sg[1] is the payload and ICV in the packet.
 * kmalloc'd, not alloc_percpu'd: scatterlists need linear-map memory. */
struct xfp_kc_gcm_req {
	struct scatterlist sg[2];
	u8 aad_iv[XFP_KC_GCM_AAD_IV_MAX];
	u8 iv[XFP_KC_IV_LEN];
	struct aead_request req; /* last: crypto_aead_reqsize() bytes of its context follow */
};

struct xfp_kc_ctx {
	u32 id;
	u32 alg;
	u32 flags;
	u8 salt[XFP_KC_SALT_LEN];
	u32 chacha_key[XFP_KC_CHACHA_KEY_WORDS]; /* ChaCha20: the key as little-endian words */
	struct crypto_aead *tfm;		 /* AES-GCM: key and salt live in the tfm */
	struct xfp_kc_gcm_req **reqs;		 /* AES-GCM: one per possible CPU */
};

static struct xfp_kc_ctx __rcu **xfp_kc_table; /* XFP_KC_CTX_MAX slots */
static DEFINE_MUTEX(xfp_kc_lock);	       /* serialises create/destroy */

/* ---- contexts ------------------------------------------------------------------------------ */
static void xfp_kc_ctx_free(struct xfp_kc_ctx *c)
{
	unsigned int cpu;

	if (c->reqs) {
		for (cpu = 0; cpu < nr_cpu_ids; cpu++)
			kfree_sensitive(c->reqs[cpu]); /* NULL for CPUs that are not possible */
		kfree(c->reqs);
	}
	/* crypto_destroy_tfm() frees the tfm (expanded AES key, salt) with kfree_sensitive(). */
	if (c->tfm)
		crypto_free_aead(c->tfm);
	memzero_explicit(c->chacha_key, sizeof(c->chacha_key));
	memzero_explicit(c->salt, sizeof(c->salt));
	kfree_sensitive(c);
}

static int xfp_kc_gcm_setup(struct xfp_kc_ctx *c, const u8 *key, u32 key_len)
{
	unsigned int cpu;
	size_t size;
	int err;

	if (key_len != 16 + XFP_KC_SALT_LEN && key_len != 32 + XFP_KC_SALT_LEN)
		return -EINVAL;
	/* Only the internal (synchronous, SIMD-only) AES-NI AEAD: mask ASYNC excludes the simd
	 * shim around it, type INTERNAL admits it. The generic gcm(aes) would be table-based AES,
	 * whose timing leaks the key: refuse instead. */
	c->tfm = crypto_alloc_aead("__rfc4106(gcm(aes))", CRYPTO_ALG_INTERNAL,
				   CRYPTO_ALG_INTERNAL | CRYPTO_ALG_ASYNC);
	if (IS_ERR(c->tfm)) {
		err = PTR_ERR(c->tfm);
		c->tfm = NULL;
		pr_info("no synchronous AES-NI rfc4106(gcm(aes)) (%d): is aesni-intel loaded?\n",
			err);
		return -ENODEV;
	}
	err = crypto_aead_setkey(c->tfm, key, key_len);
	if (!err)
		err = crypto_aead_setauthsize(c->tfm, XFP_KC_ICV_LEN);
	if (err)
		return err == -ENOMEM ? err : -EINVAL;
	c->reqs = kcalloc(nr_cpu_ids, sizeof(*c->reqs), GFP_KERNEL);
	if (!c->reqs)
		return -ENOMEM;
	size = sizeof(struct xfp_kc_gcm_req) + crypto_aead_reqsize(c->tfm);
	for (cpu = 0; cpu < nr_cpu_ids; cpu++) {
		struct xfp_kc_gcm_req *r;

		if (!cpu_possible(cpu))
			continue;
		r = kzalloc_node(size, GFP_KERNEL, cpu_to_node(cpu));
		if (!r)
			return -ENOMEM;
		aead_request_set_tfm(&r->req, c->tfm);
		aead_request_set_callback(&r->req, 0, NULL, NULL);
		c->reqs[cpu] = r;
	}
	return 0;
}

static int xfp_kc_create(struct xfp_kc_create *arg)
{
	struct xfp_kc_ctx *c;
	int err = 0;

	if (arg->id >= XFP_KC_CTX_MAX)
		return -ERANGE;
	if (arg->flags & ~XFP_KC_F_ESN)
		return -EINVAL;
	if (arg->alg != XFP_KCA_CHACHA20_POLY1305 && arg->alg != XFP_KCA_AES_GCM)
		return -EOPNOTSUPP;
	if (arg->key_len > XFP_KC_KEY_MAX || arg->key_len < XFP_KC_SALT_LEN)
		return -EINVAL;
	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c)
		return -ENOMEM;
	c->id = arg->id;
	c->alg = arg->alg;
	c->flags = arg->flags;
	memcpy(c->salt, arg->key + arg->key_len - XFP_KC_SALT_LEN, XFP_KC_SALT_LEN);
	if (arg->alg == XFP_KCA_CHACHA20_POLY1305) {
		int i;

		if (arg->key_len != XFP_KC_CHACHA_KEY_LEN + XFP_KC_SALT_LEN) {
			err = -EINVAL;
			goto out;
		}
		for (i = 0; i < XFP_KC_CHACHA_KEY_WORDS; i++)
			c->chacha_key[i] = get_unaligned_le32(arg->key + 4 * i);
	} else {
		err = xfp_kc_gcm_setup(c, arg->key, arg->key_len);
		if (err)
			goto out;
	}
	mutex_lock(&xfp_kc_lock);
	if (rcu_access_pointer(xfp_kc_table[arg->id]))
		err = -EEXIST;
	else
		rcu_assign_pointer(xfp_kc_table[arg->id], c);
	mutex_unlock(&xfp_kc_lock);
out:
	if (err)
		xfp_kc_ctx_free(c);
	return err;
}

static int xfp_kc_destroy(u32 id)
{
	struct xfp_kc_ctx *c;

	if (id >= XFP_KC_CTX_MAX)
		return -ERANGE;
	mutex_lock(&xfp_kc_lock);
	c = rcu_dereference_protected(xfp_kc_table[id], lockdep_is_held(&xfp_kc_lock));
	RCU_INIT_POINTER(xfp_kc_table[id], NULL);
	mutex_unlock(&xfp_kc_lock);
	if (!c)
		return -ENOENT;
	synchronize_rcu(); /* no kfunc still uses it */
	xfp_kc_ctx_free(c);
	return 0;
}

static void xfp_kc_flush(void)
{
	struct xfp_kc_ctx *gone[32];
	u32 id = 0;

	/* In batches, so that one grace period covers many contexts. */
	while (id < XFP_KC_CTX_MAX) {
		int n = 0, i;

		mutex_lock(&xfp_kc_lock);
		for (; id < XFP_KC_CTX_MAX && n < ARRAY_SIZE(gone); id++) {
			struct xfp_kc_ctx *c = rcu_dereference_protected(
			    xfp_kc_table[id], lockdep_is_held(&xfp_kc_lock));

			if (c) {
				RCU_INIT_POINTER(xfp_kc_table[id], NULL);
				gone[n++] = c;
			}
		}
		mutex_unlock(&xfp_kc_lock);
		if (!n)
			continue;
		synchronize_rcu();
		for (i = 0; i < n; i++)
			xfp_kc_ctx_free(gone[i]);
	}
}

static long xfp_kc_ioctl(struct file *f, unsigned int cmd, unsigned long uarg)
{
	void __user *up = (void __user *)uarg;
	struct xfp_kc_create arg;
	long err;
	u32 id;

	if (!capable(CAP_NET_ADMIN))
		return -EPERM;
	switch (cmd) {
	case XFP_KC_IOC_CREATE:
		if (copy_from_user(&arg, up, sizeof(arg)))
			return -EFAULT;
		err = xfp_kc_create(&arg);
		memzero_explicit(&arg, sizeof(arg));
		return err;
	case XFP_KC_IOC_DESTROY:
		if (get_user(id, (u32 __user *)up))
			return -EFAULT;
		return xfp_kc_destroy(id);
	case XFP_KC_IOC_FLUSH:
		xfp_kc_flush();
		return 0;
	default:
		return -ENOTTY;
	}
}

static const struct file_operations xfp_kc_fops = {
    .owner = THIS_MODULE, /* rmmod is refused while the device is open */
    .unlocked_ioctl = xfp_kc_ioctl,
    .compat_ioctl = compat_ptr_ioctl,
    .llseek = noop_llseek,
};

static struct miscdevice xfp_kc_dev = {
    .minor = MISC_DYNAMIC_MINOR,
    .name = "xfp_crypto",
    .fops = &xfp_kc_fops,
    .mode = 0600,
};

/* ---- the AEADs ----------------------------------------------------------------------------- */
/* The AAD (RFC 4303 section 2.2.1 with ESN; RFC 7634 section 2.1; RFC 4106 section 5) into
 * aad; returns its length. */
static unsigned int xfp_kc_aad(const struct xfp_kc_ctx *c, const u8 *esp, u32 seq_hi, u8 *aad)
{
	memcpy(aad, esp, 4); /* SPI */
	if (c->flags & XFP_KC_F_ESN) {
		put_unaligned_be32(seq_hi, aad + 4);
		memcpy(aad + 8, esp + 4, 4);
		return 12;
	}
	memcpy(aad + 4, esp + 4, 4);
	return 8;
}

static const u8 xfp_kc_zero_pad[16];

/* RFC 8439 section 2.8: ChaCha20 keyed with the context's key, nonce salt || IV (RFC 7634
 * section 2); block 0 gives the one-time Poly1305 key (section 2.6), the payload is encrypted
 * from block 1, the tag covers AAD || pad16 || ciphertext || pad16 || le64 lengths. */
static int xfp_kc_chacha(const struct xfp_kc_ctx *c, u8 *esp, u32 len, u32 seq_hi, bool seal)
{
	u8 *payload = esp + XFP_KC_PAYLOAD_OFF, *icv = payload + len;
	u32 state[CHACHA_STATE_WORDS] __aligned(16);
	u8 block0[CHACHA_BLOCK_SIZE] __aligned(16);
	u8 iv[CHACHA_IV_SIZE], aad[XFP_KC_AAD_MAX], tag[POLY1305_DIGEST_SIZE];
	struct poly1305_desc_ctx mac;
	unsigned int aad_len;
	__le64 lens[2];
	int ret = XFP_KCR_OK;

	put_unaligned_le32(0, iv); /* block counter */
	memcpy(iv + 4, c->salt, XFP_KC_SALT_LEN);
	memcpy(iv + 8, esp + 8, XFP_KC_IV_LEN);
	chacha_init_arch(state, c->chacha_key, iv);
	memset(block0, 0, sizeof(block0));
	chacha_crypt_arch(state, block0, block0, sizeof(block0), 20); /* counter is 1 after it */
	poly1305_init_arch(&mac, block0);

	if (seal)
		chacha_crypt_arch(state, payload, payload, len, 20);
	aad_len = xfp_kc_aad(c, esp, seq_hi, aad);
	poly1305_update_arch(&mac, aad, aad_len);
	poly1305_update_arch(&mac, xfp_kc_zero_pad, (16 - aad_len) & 15);
	poly1305_update_arch(&mac, payload, len);
	poly1305_update_arch(&mac, xfp_kc_zero_pad, (16 - len) & 15);
	lens[0] = cpu_to_le64(aad_len);
	lens[1] = cpu_to_le64(len);
	poly1305_update_arch(&mac, (const u8 *)lens, sizeof(lens));
	poly1305_final_arch(&mac, tag);

	if (seal) {
		memcpy(icv, tag, sizeof(tag));
	} else if (crypto_memneq(tag, icv, sizeof(tag))) {
		ret = XFP_KCR_BAD_TAG; /* verified before decrypting: the payload is untouched */
	} else {
		chacha_crypt_arch(state, payload, payload, len, 20);
	}
	memzero_explicit(state, sizeof(state));
	memzero_explicit(block0, sizeof(block0));
	memzero_explicit(&mac, sizeof(mac));
	return ret;
}

/* RFC 4106 through aesni's internal AEAD, on this CPU's prepared request. */
static int xfp_kc_gcm(const struct xfp_kc_ctx *c, u8 *esp, u32 len, u32 seq_hi, bool seal)
{
	u8 *payload = esp + XFP_KC_PAYLOAD_OFF;
	struct xfp_kc_gcm_req *r;
	unsigned int aad_len;
	int err;

	/* The request is this CPU's: keep softirqs (another packet) and preemption out. */
	local_bh_disable();
	r = c->reqs[smp_processor_id()];
	aad_len = xfp_kc_aad(c, esp, seq_hi, r->aad_iv);
	memcpy(r->aad_iv + aad_len, esp + 8, XFP_KC_IV_LEN);
	memcpy(r->iv, esp + 8, XFP_KC_IV_LEN);
	sg_init_table(r->sg, 2);
	sg_set_buf(&r->sg[0], r->aad_iv, aad_len + XFP_KC_IV_LEN);
	sg_set_buf(&r->sg[1], payload, len + XFP_KC_ICV_LEN);
	aead_request_set_crypt(&r->req, r->sg, r->sg, seal ? len : len + XFP_KC_ICV_LEN, r->iv);
	aead_request_set_ad(&r->req, aad_len + XFP_KC_IV_LEN);
	err = seal ? crypto_aead_encrypt(&r->req) : crypto_aead_decrypt(&r->req);
	local_bh_enable();
	if (err == -EBADMSG)
		return XFP_KCR_BAD_TAG;
	return err ? XFP_KCR_CRYPTO : XFP_KCR_OK;
}

/* The checks every kfunc makes before touching the packet: [esp_off, esp_off + 16 + len + 16)
 * must lie within [data, end), the linear part of the packet. */
static int xfp_kc_run(u8 *data, u64 avail, u32 id, u32 esp_off, u32 len, u32 seq_hi, bool seal)
{
	const struct xfp_kc_ctx *c;

	if ((u64)esp_off + XFP_KC_PAYLOAD_OFF + len + XFP_KC_ICV_LEN > avail)
		return XFP_KCR_BOUNDS;
	if (id >= XFP_KC_CTX_MAX)
		return XFP_KCR_NO_CTX;
	c = rcu_dereference(xfp_kc_table[id]); /* BPF programs run under rcu_read_lock() */
	if (!c)
		return XFP_KCR_NO_CTX;
	if (!crypto_simd_usable())
		return XFP_KCR_NO_SIMD;
	if (c->alg == XFP_KCA_CHACHA20_POLY1305)
		return xfp_kc_chacha(c, data + esp_off, len, seq_hi, seal);
	return xfp_kc_gcm(c, data + esp_off, len, seq_hi, seal);
}

static int xfp_kc_xdp(struct xdp_md *ctx, u32 id, u32 esp_off, u32 len, u32 seq_hi, bool seal)
{
	struct xdp_buff *xdp = (struct xdp_buff *)ctx;
	u8 *data = xdp->data;

	if (xdp_buff_has_frags(xdp))
		return XFP_KCR_FRAGS;
	return xfp_kc_run(data, (u8 *)xdp->data_end - data, id, esp_off, len, seq_hi, seal);
}

static int xfp_kc_skb(struct __sk_buff *ctx, u32 id, u32 esp_off, u32 len, u32 seq_hi, bool seal)
{
	struct sk_buff *skb = (struct sk_buff *)ctx;
	u64 need = (u64)esp_off + XFP_KC_PAYLOAD_OFF + len + XFP_KC_ICV_LEN;

	if (need > skb->len)
		return XFP_KCR_BOUNDS;
	if (need > skb_headlen(skb))
		return XFP_KCR_FRAGS;
	if (skb_cloned(skb) && !skb_clone_writable(skb, need))
		return XFP_KCR_SHARED;
	return xfp_kc_run(skb->data, skb_headlen(skb), id, esp_off, len, seq_hi, seal);
}

/* ---- kfuncs -------------------------------------------------------------------------------- */
__diag_push();
__diag_ignore_all("-Wmissing-prototypes", "Global kfuncs: their definitions are in BTF");

noinline int xfp_kc_xdp_seal(struct xdp_md *ctx, u32 id, u32 esp_off, u32 len, u32 seq_hi)
{
	return xfp_kc_xdp(ctx, id, esp_off, len, seq_hi, true);
}

noinline int xfp_kc_xdp_open(struct xdp_md *ctx, u32 id, u32 esp_off, u32 len, u32 seq_hi)
{
	return xfp_kc_xdp(ctx, id, esp_off, len, seq_hi, false);
}

noinline int xfp_kc_skb_seal(struct __sk_buff *ctx, u32 id, u32 esp_off, u32 len, u32 seq_hi)
{
	return xfp_kc_skb(ctx, id, esp_off, len, seq_hi, true);
}

noinline int xfp_kc_skb_open(struct __sk_buff *ctx, u32 id, u32 esp_off, u32 len, u32 seq_hi)
{
	return xfp_kc_skb(ctx, id, esp_off, len, seq_hi, false);
}

__diag_pop();

BTF_SET8_START(xfp_kc_xdp_ids)
BTF_ID_FLAGS(func, xfp_kc_xdp_seal)
BTF_ID_FLAGS(func, xfp_kc_xdp_open)
BTF_SET8_END(xfp_kc_xdp_ids)

BTF_SET8_START(xfp_kc_skb_ids)
BTF_ID_FLAGS(func, xfp_kc_skb_seal)
BTF_ID_FLAGS(func, xfp_kc_skb_open)
BTF_SET8_END(xfp_kc_skb_ids)

static const struct btf_kfunc_id_set xfp_kc_xdp_set = {
    .owner = THIS_MODULE,
    .set = &xfp_kc_xdp_ids,
};

static const struct btf_kfunc_id_set xfp_kc_skb_set = {
    .owner = THIS_MODULE,
    .set = &xfp_kc_skb_ids,
};

/* ---- module -------------------------------------------------------------------------------- */
static int __init xfp_kc_init(void)
{
	int err;

	xfp_kc_table = kvcalloc(XFP_KC_CTX_MAX, sizeof(*xfp_kc_table), GFP_KERNEL);
	if (!xfp_kc_table)
		return -ENOMEM;
	/* Without module BTF register_btf_kfunc_id_set() warns and returns 0: the loader then
	 * finds no xfp_crypto BTF object and says so. */
	err = register_btf_kfunc_id_set(BPF_PROG_TYPE_XDP, &xfp_kc_xdp_set);
	if (!err)
		err = register_btf_kfunc_id_set(BPF_PROG_TYPE_SCHED_CLS, &xfp_kc_skb_set);
	if (!err)
		err = misc_register(&xfp_kc_dev);
	if (err) {
		kvfree(xfp_kc_table);
		return err;
	}
	return 0;
}

static void __exit xfp_kc_exit(void)
{
	misc_deregister(&xfp_kc_dev);
	xfp_kc_flush(); /* zeroizes what the controller left */
	kvfree(xfp_kc_table);
}

module_init(xfp_kc_init);
module_exit(xfp_kc_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("xfrm-fastpath: ESP ChaCha20-Poly1305 and AES-GCM kfuncs for XDP and TC");
/* The ChaCha20 and Poly1305 libraries are hard dependencies (symbols). aesni-intel is not: the
 * AES-GCM AEAD is looked up by name when a context is made, and a CPU without AES-NI (where
 * aesni-intel refuses to load) still gets ChaCha20-Poly1305. Load it before making AES-GCM
 * contexts (modprobe aesni_intel). */
