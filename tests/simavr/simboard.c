/*
 * simboard: a simulated AVR mainboard (ATmega328P / 1284P / 2560 at 16 MHz) running a real
 * bootloader in real time behind a pty, so host tools (avrdude, our flashers, OctoPrint) talk
 * to it exactly as they would to a USB-serial board.
 *
 * Why each piece exists (see research/avr.md):
 *  - reset on open: on Linux a pty master polls POLLHUP while nobody holds the slave open, so
 *    the HUP -> no-HUP edge is "a host opened the port", which on a real board pulses /RESET
 *    through DTR and the 100 nF capacitor. We reset with MCUSR = EXTRF (optiboot only stays in
 *    the bootloader after an external reset).
 *  - our own UART pacing: simavr 1.6 counts a phantom parity bit and lets firmware read bursts
 *    at twice the line rate, and its poll-sleep flag makes polling bootloaders 100x too slow.
 *    We deliver one character per character time, keep the AVR's 2-byte FIFO + shift register
 *    (overrun drops), lose characters while RXEN is off and re-sample every character bit by
 *    bit between the host's termios baud and the AVR's UBRR baud, so a baud mismatch garbles
 *    deterministically the way a real receiver would.
 *  - SPM wrapper: simavr erases from Z instead of the page start and overwrites instead of
 *    AND-ing; real flash only clears bits on write. Writes to pages that were not erased are
 *    reported ("written without erase"), which exposes the stk500v2 sequential erase pointer.
 *    Erase/write take the datasheet's ~4 ms: the CPU halts for NRWW pages and keeps running
 *    (SPMEN busy) for RWW pages, as on silicon.
 *  - optional USB-serial latency: fixed per direction, or the FTDI latency timer (device->host
 *    bytes are held until 62 accumulate or 16 ms have passed since the last flush).
 *
 *  - optional W25X20CL SPI flash on the SPI pins with /CS on a port pin (spiflash.c), the
 *    Einsy RAMBo's language flash; optional faults of the host link: the early Einsy 32U2
 *    firmware's extra 0xFF after every ';' (0x3B) from the host, and one lost host byte.
 *
 * Control: SIGUSR1 dumps the flash to --dump (and the SPI flash to --spi-dump first; prints
 * "DUMPED <path>"), SIGUSR2 is an external reset, SIGTERM exits cleanly. With --control,
 * stdin takes one command a line: "drop N" (lose the Nth byte the host sends from now on),
 * "semicolon on|off" (the 32U2 defect), "spistats" (prints "SPISTATS ..."). stdout carries
 * one event per line: READY, RESET, WARN, LAG, FAULT, ...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <simavr/avr_flash.h>
#include <simavr/avr_ioport.h>
#include <simavr/avr_uart.h>
#include <simavr/sim_avr.h>
#include <simavr/sim_cycle_timers.h>
#include <simavr/sim_io.h>
#include <simavr/sim_irq.h>

#include "spiflash.h"

/* the fifo accessors are static inlines that only avr_uart.c instantiates */
DEFINE_FIFO(uint16_t, uart_fifo);

#define MCUSR_ADDR 0x54 /* same data address on m328p, m1284p, m2560 */
#define CHUNK_US 50
#define LAG_REBASE_US 20000
#define QSIZE 65536

typedef struct {
	uint8_t byte;
	avr_cycle_count_t when;
} qent_t;

typedef struct {
	qent_t e[QSIZE];
	unsigned head, tail; /* head == tail: empty */
} queue_t;

static int q_len(const queue_t *q) { return (int)((q->tail - q->head) % QSIZE); }
static int q_full(const queue_t *q) { return q_len(q) == QSIZE - 1; }
static void q_push(queue_t *q, uint8_t b, avr_cycle_count_t when)
{
	q->e[q->tail].byte = b;
	q->e[q->tail].when = when;
	q->tail = (q->tail + 1) % QSIZE;
}
static qent_t *q_head(queue_t *q) { return q->head == q->tail ? NULL : &q->e[q->head]; }
static void q_pop(queue_t *q) { q->head = (q->head + 1) % QSIZE; }
static void q_clear(queue_t *q) { q->head = q->tail = 0; }

enum { LAT_NONE, LAT_FIXED, LAT_FTDI };

/* Serial frame: bit time in cycles plus the frame's shape. */
typedef struct {
	double bit_cycles;
	int data_bits, parity, stop_bits; /* parity: 0 none, 1 even, 2 odd */
} frame_t;

static struct {
	avr_t *avr;
	avr_uart_t *uart;
	avr_flash_t *flash;
	int (*flash_ioctl_orig)(struct avr_io_t *, uint32_t, void *);
	void (*reset_orig)(avr_t *);

	int master;
	char slave_name[256];
	const char *port_link;
	const char *dump_path;
	int auto_reset;
	uint32_t boot_start;
	uint32_t nrww_start;
	avr_cycle_count_t spm_cycles;

	int lat_mode;
	avr_cycle_count_t lat_cycles;
	uint8_t ftdi_buf[64];
	int ftdi_len;
	avr_cycle_count_t ftdi_last_flush;

	queue_t rxq;  /* host -> AVR, when = cycle the byte may start on the wire */
	queue_t txq;  /* AVR -> host, when = cycle the stop bit ends */
	int rx_armed;
	avr_cycle_count_t rx_line_free;
	avr_cycle_count_t tx_line_free;

	uint8_t *erased; /* per SPM page: erased since its last write */
	int spi_flash;       /* a W25X20CL is attached */
	const char *spi_dump_path;
	int semicolon_defect; /* host 0x3B arrives followed by an extra 0xFF (early Einsy 32U2) */
	long drop_in;         /* lose the host byte when this count reaches 0 (-1: off) */
	int control;          /* commands on stdin */
	int bootrst;          /* every reset starts the bootloader (BOOTRST fuse) */
	int in_reset;         /* a power-on or external reset is under way */
	unsigned long overruns, rx_lost_rxen, host_drops;
	int stopped_logged;
} B;

static volatile sig_atomic_t sig_term, sig_dump, sig_reset;
static void on_signal(int s)
{
	if (s == SIGUSR1)
		sig_dump = 1;
	else if (s == SIGUSR2)
		sig_reset = 1;
	else
		sig_term = 1;
}

static void event(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static void sim_logger(avr_t *avr, const int level, const char *fmt, va_list ap)
{
	(void)avr;
	if (level > LOG_WARNING)
		return;
	fputs("simavr: ", stderr);
	vfprintf(stderr, fmt, ap);
}

static double now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static avr_cycle_count_t us_to_cycles(double us) { return (avr_cycle_count_t)(us * B.avr->frequency / 1e6); }

/* ---------------------------------------------------------------- serial frames */

static frame_t avr_frame(void)
{
	avr_t *avr = B.avr;
	avr_uart_t *p = B.uart;
	uint32_t ubrr = avr_regbit_get(avr, p->ubrrl) | (avr_regbit_get(avr, p->ubrrh) << 8);
	uint8_t c = avr->data[p->r_ucsrc];
	static const int dbits[8] = {5, 6, 7, 8, 8, 8, 8, 9};
	frame_t f;
	f.bit_cycles = (double)(ubrr + 1) * (avr_regbit_get(avr, p->u2x) ? 8 : 16);
	f.data_bits = dbits[((c >> 1) & 3) | (avr_regbit_get(avr, p->ucsz2) << 2)];
	if (f.data_bits > 8)
		f.data_bits = 8; /* 9-bit mode is not used by any bootloader we run */
	f.parity = ((c >> 4) & 3) == 2 ? 1 : ((c >> 4) & 3) == 3 ? 2 : 0;
	f.stop_bits = (c & 0x08) ? 2 : 1;
	return f;
}

static int frame_bits(const frame_t *f) { return 1 + f->data_bits + (f->parity ? 1 : 0) + f->stop_bits; }

static long speed_to_baud(speed_t s)
{
	switch (s) {
	case B300: return 300;
	case B1200: return 1200;
	case B2400: return 2400;
	case B4800: return 4800;
	case B9600: return 9600;
	case B19200: return 19200;
	case B38400: return 38400;
	case B57600: return 57600;
	case B115200: return 115200;
	case B230400: return 230400;
	case B460800: return 460800;
	case B500000: return 500000;
	case B576000: return 576000;
	case B921600: return 921600;
	case B1000000: return 1000000;
	case B1152000: return 1152000;
	case B1500000: return 1500000;
	case B2000000: return 2000000;
	default: return 0;
	}
}

/* The host side's frame as its termios (set on the slave, visible on the master) says. */
static frame_t host_frame(void)
{
	struct termios t;
	frame_t f = {0};
	long baud = 0;
	if (tcgetattr(B.master, &t) == 0)
		baud = speed_to_baud(cfgetospeed(&t));
	if (baud <= 0)
		baud = 9600; /* B0 or exotic: the tty layer's historical default */
	f.bit_cycles = (double)B.avr->frequency / baud;
	switch (t.c_cflag & CSIZE) {
	case CS5: f.data_bits = 5; break;
	case CS6: f.data_bits = 6; break;
	case CS7: f.data_bits = 7; break;
	default: f.data_bits = 8;
	}
	f.parity = (t.c_cflag & PARENB) ? ((t.c_cflag & PARODD) ? 2 : 1) : 0;
	f.stop_bits = (t.c_cflag & CSTOPB) ? 2 : 1;
	return f;
}

/*
 * Send one character with frame `src` and receive it with frame `dst`: the receiver syncs on
 * the start edge and samples the middle of each of its bit cells. Equal or close bauds (<~4 %)
 * give back the same byte; a mismatch gives the garbage a real UART would. Returns -1 if the
 * receiver does not see a valid start bit, else the byte, with 0x100 set on a framing error.
 */
static int resample(uint8_t v, const frame_t *src, const frame_t *dst)
{
	int nsrc = frame_bits(src);
	int level[16];
	int ones = 0;
	level[0] = 0;
	for (int i = 0; i < src->data_bits; i++) {
		level[1 + i] = (v >> i) & 1;
		ones += level[1 + i];
	}
	int k = 1 + src->data_bits;
	if (src->parity)
		level[k++] = src->parity == 1 ? (ones & 1) : !(ones & 1);
	while (k < nsrc)
		level[k++] = 1;

	int out = 0, fe = 0;
	int nbits = frame_bits(dst) - dst->stop_bits + 1; /* up to and including first stop bit */
	for (int i = 0; i < nbits; i++) {
		double t = (i + 0.5) * dst->bit_cycles;
		int idx = (int)(t / src->bit_cycles);
		int bit = idx < nsrc ? level[idx] : 1; /* idle line after the frame */
		if (i == 0 && bit)
			return -1;
		if (i >= 1 && i <= dst->data_bits)
			out |= bit << (i - 1);
		if (i == nbits - 1 && !bit)
			fe = 1;
	}
	return out | (fe ? 0x100 : 0);
}

/* Keep simavr's idea of a character time (used for UDRE/TXC pacing) free of its phantom
 * parity bit: recompute whenever baud or frame registers change. */
static void uart_fix_timing(void)
{
	frame_t f = avr_frame();
	B.uart->cycles_per_byte = (avr_cycle_count_t)(f.bit_cycles * frame_bits(&f));
}

static void hook_reg_passive(avr_t *avr, avr_io_addr_t addr, uint8_t v, void *param)
{
	(void)avr; (void)addr; (void)v; (void)param;
	uart_fix_timing();
}

static void hook_reg_store(avr_t *avr, avr_io_addr_t addr, uint8_t v, void *param)
{
	(void)param;
	avr->data[addr] = v;
	uart_fix_timing();
}

/* ---------------------------------------------------------------- host -> AVR */

static avr_cycle_count_t rx_schedule(avr_cycle_count_t line_free, avr_cycle_count_t ready)
{
	frame_t h = host_frame();
	avr_cycle_count_t start = line_free > ready ? line_free : ready;
	return start + (avr_cycle_count_t)(h.bit_cycles * frame_bits(&h));
}

static void rx_deliver(uint8_t byte)
{
	avr_t *avr = B.avr;
	avr_uart_t *p = B.uart;
	frame_t h = host_frame(), a = avr_frame();
	int r = resample(byte, &h, &a);
	if (r < 0)
		return; /* no start bit seen: the receiver ignores it */
	if (!avr_regbit_get(avr, p->rxen)) {
		B.rx_lost_rxen++;
		return;
	}
	/* two-level receive buffer plus the shift register */
	if (uart_fifo_get_read_size(&p->input) >= 3) {
		avr_regbit_setto(avr, p->dor, 1);
		if (B.overruns++ < 20 || B.overruns % 1000 == 0)
			event("WARN uart overrun: receive buffer full, byte 0x%02x lost (total %lu)", byte,
			      B.overruns);
		return;
	}
	uart_fifo_write(&p->input, (uint16_t)((r & 0xff) | ((r & 0x100) ? UART_INPUT_FE : 0)));
	/* defeat simavr's "two reads per RXC raise" heuristic: our pacing is the real one */
	p->rxc_raise_time = 0;
	avr_raise_interrupt(avr, &p->rxc);
}

static avr_cycle_count_t rx_pump(avr_t *avr, avr_cycle_count_t when, void *param)
{
	(void)avr; (void)param;
	qent_t *e = q_head(&B.rxq);
	if (!e) {
		B.rx_armed = 0;
		return 0;
	}
	rx_deliver(e->byte);
	q_pop(&B.rxq);
	B.rx_line_free = when;
	e = q_head(&B.rxq);
	if (!e) {
		B.rx_armed = 0;
		return 0;
	}
	return rx_schedule(when, e->when);
}

static void rx_arm(void)
{
	qent_t *e = q_head(&B.rxq);
	if (B.rx_armed || !e)
		return;
	avr_cycle_count_t now = B.avr->cycle;
	avr_cycle_count_t done = rx_schedule(B.rx_line_free > now ? B.rx_line_free : now, e->when);
	avr_cycle_timer_register(B.avr, done - now, rx_pump, NULL);
	B.rx_armed = 1;
}

/* ---------------------------------------------------------------- AVR -> host */

static void tx_hook(struct avr_irq_t *irq, uint32_t value, void *param)
{
	(void)irq; (void)param;
	frame_t a = avr_frame();
	avr_cycle_count_t now = B.avr->cycle;
	avr_cycle_count_t start = B.tx_line_free > now ? B.tx_line_free : now;
	avr_cycle_count_t done = start + (avr_cycle_count_t)(a.bit_cycles * frame_bits(&a));
	B.tx_line_free = done;
	if (q_full(&B.txq))
		return;
	q_push(&B.txq, (uint8_t)value, done);
}

static void host_write(const uint8_t *buf, int n, int hup)
{
	if (hup || n <= 0)
		return; /* nobody listening: the bytes fall off the line */
	ssize_t w = write(B.master, buf, (size_t)n);
	if (w < n) {
		B.host_drops += (unsigned long)(n - (w > 0 ? w : 0));
		if (B.host_drops < 100 || B.host_drops % 10000 == 0)
			event("WARN host is not reading: %lu bytes dropped", B.host_drops);
	}
}

static void ftdi_flush(int hup)
{
	host_write(B.ftdi_buf, B.ftdi_len, hup);
	B.ftdi_len = 0;
	B.ftdi_last_flush = B.avr->cycle;
}

static void tx_release(int hup)
{
	avr_cycle_count_t now = B.avr->cycle;
	uint8_t buf[4096];
	int n = 0;
	frame_t a = avr_frame(), h = host_frame();
	qent_t *e;
	while ((e = q_head(&B.txq)) != NULL) {
		avr_cycle_count_t due = e->when + (B.lat_mode == LAT_FIXED ? B.lat_cycles : 0);
		if (due > now)
			break;
		int r = resample(e->byte, &a, &h);
		q_pop(&B.txq);
		if (r < 0)
			continue;
		if (B.lat_mode == LAT_FTDI) {
			B.ftdi_buf[B.ftdi_len++] = (uint8_t)r;
			if (B.ftdi_len >= 62)
				ftdi_flush(hup);
		} else {
			buf[n++] = (uint8_t)r;
			if (n == (int)sizeof(buf)) {
				host_write(buf, n, hup);
				n = 0;
			}
		}
	}
	host_write(buf, n, hup);
	if (B.lat_mode == LAT_FTDI && now - B.ftdi_last_flush >= B.lat_cycles) {
		if (B.ftdi_len)
			ftdi_flush(hup);
		else
			B.ftdi_last_flush = now;
	}
}

/* ---------------------------------------------------------------- flash (SPM) */

static avr_cycle_count_t spm_done(avr_t *avr, avr_cycle_count_t when, void *param)
{
	(void)when; (void)param;
	avr_regbit_clear(avr, B.flash->selfprgen);
	return 0;
}

static void spm_busy(uint32_t addr)
{
	if (!B.spm_cycles)
		return;
	if (addr >= B.nrww_start) {
		/* NRWW section: the CPU halts until the operation completes */
		B.avr->cycle += B.spm_cycles;
	} else {
		/* RWW section: the CPU runs on while SPMEN reads busy and RWW reads are blocked */
		avr_regbit_set(B.avr, B.flash->selfprgen);
		if (B.flash->rwwsb.reg)
			avr_regbit_set(B.avr, B.flash->rwwsb);
		avr_cycle_timer_register(B.avr, B.spm_cycles, spm_done, NULL);
	}
}

static int flash_ioctl(struct avr_io_t *port, uint32_t ctl, void *param)
{
	if (ctl != AVR_IOCTL_FLASH_SPM)
		return B.flash_ioctl_orig(port, ctl, param);
	avr_t *avr = B.avr;
	avr_flash_t *p = B.flash;
	uint32_t size = avr->flashend + 1;
	uint32_t ps = p->spm_pagesize;
	uint32_t z = avr->data[R_ZL] | (avr->data[R_ZH] << 8);
	if (avr->rampz)
		z |= (uint32_t)avr->data[avr->rampz] << 16;
	z %= size;
	uint32_t page = z & ~(ps - 1);
	int en = avr_regbit_get(avr, p->selfprgen);
	int is_erase = en && avr_regbit_get(avr, p->pgers);
	int is_write = en && !is_erase && avr_regbit_get(avr, p->pgwrt);
	int is_rwwsre = en && !is_erase && !is_write && !avr_regbit_get(avr, p->blbset) &&
	                (p->flags & AVR_SELFPROG_HAVE_RWW) && avr_regbit_get(avr, p->rwwsre);

	if (is_erase) {
		/* simavr erases spm_pagesize bytes from Z itself; silicon erases the aligned page */
		uint32_t from = z & ~1u;
		uint32_t n = from + ps <= size ? ps : size - from;
		uint8_t save[1024];
		memcpy(save, avr->flash + from, n);
		int r = B.flash_ioctl_orig(port, ctl, param);
		memcpy(avr->flash + from, save, n);
		memset(avr->flash + page, 0xff, ps);
		B.erased[page / ps] = 1;
		spm_busy(page);
		return r;
	}
	if (is_write) {
		uint8_t before[1024];
		memcpy(before, avr->flash + page, ps);
		int r = B.flash_ioctl_orig(port, ctl, param);
		int differ = 0;
		for (uint32_t i = 0; i < ps; i++) {
			uint8_t want = avr->flash[page + i];
			uint8_t got = before[i] & want; /* flash cells can only go from 1 to 0 */
			if (got != want)
				differ++;
			avr->flash[page + i] = got;
		}
		if (!B.erased[page / ps])
			event("WARN page 0x%05x written without erase (%d bytes differ from the data written)",
			      page, differ);
		B.erased[page / ps] = 0;
		spm_busy(page);
		return r;
	}
	int r = B.flash_ioctl_orig(port, ctl, param);
	if (is_rwwsre && p->rwwsb.reg)
		avr_regbit_clear(avr, p->rwwsb);
	return r;
}

static void init_erased_map(void)
{
	uint32_t ps = B.flash->spm_pagesize, size = B.avr->flashend + 1;
	for (uint32_t pg = 0; pg < size / ps; pg++) {
		B.erased[pg] = 1;
		for (uint32_t i = 0; i < ps; i++)
			if (B.avr->flash[pg * ps + i] != 0xff) {
				B.erased[pg] = 0;
				break;
			}
	}
}

/* simavr's default sleep callback usleep()s while the AVR sleeps; our main loop already keeps
 * simulated time on wall time, so sleeping here would only make the board fall behind. */
static void no_sleep(avr_t *avr, avr_cycle_count_t howlong)
{
	(void)avr; (void)howlong;
}

/* ---------------------------------------------------------------- reset */

/* avr_reset() wipes every cycle timer, ours included: re-arm the receive pump. */
static void reset_hook(avr_t *avr)
{
	if (B.reset_orig)
		B.reset_orig(avr);
	if (B.spi_flash)
		spiflash_mcu_reset();
	if (!B.in_reset)
		event("RESET watchdog"); /* neither power-on nor /RESET (simavr sets WDRF itself) */
	B.rx_armed = 0;
	if (B.uart)
		rx_arm();
}

static void external_reset(const char *why)
{
	avr_t *avr = B.avr;
	B.in_reset = 1;
	avr_reset(avr);
	B.in_reset = 0;
	avr->pc = B.boot_start;
	if (avr->reset_flags.extrf.reg)
		avr_regbit_set(avr, avr->reset_flags.extrf);
	else
		avr->data[MCUSR_ADDR] |= 0x02;
	B.stopped_logged = 0;
	event("RESET %s", why);
}

/* ---------------------------------------------------------------- hex loading */

static int hexval(const char *s, int n)
{
	int v = 0;
	for (int i = 0; i < n; i++) {
		char c = s[i];
		int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
		        : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
		if (d < 0)
			return -1;
		v = v * 16 + d;
	}
	return v;
}

/* Intel HEX into flash: types 00/01/02/04; 03/05 (start address) are ignored, and so is data
 * past the end of flash (Debian's m328 optiboot hex has some). Returns bytes loaded or -1. */
static long load_hex(const char *path)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		fprintf(stderr, "simboard: cannot open %s: %s\n", path, strerror(errno));
		return -1;
	}
	char line[600];
	uint32_t base = 0, size = B.avr->flashend + 1;
	long loaded = 0, beyond = 0;
	int lineno = 0;
	while (fgets(line, sizeof line, f)) {
		lineno++;
		char *s = line;
		while (*s == ' ' || *s == '\t')
			s++;
		if (*s != ':')
			continue;
		s++;
		int n = hexval(s, 2), a = hexval(s + 2, 4), t = hexval(s + 6, 2);
		if (n < 0 || a < 0 || t < 0 || (int)strlen(s) < 10 + 2 * n) {
			fprintf(stderr, "simboard: %s:%d: malformed record\n", path, lineno);
			fclose(f);
			return -1;
		}
		int sum = n + (a >> 8) + (a & 0xff) + t;
		uint8_t data[256];
		for (int i = 0; i < n; i++) {
			data[i] = (uint8_t)hexval(s + 8 + 2 * i, 2);
			sum += data[i];
		}
		if (((sum + hexval(s + 8 + 2 * n, 2)) & 0xff) != 0) {
			fprintf(stderr, "simboard: %s:%d: checksum error\n", path, lineno);
			fclose(f);
			return -1;
		}
		if (t == 0) {
			for (int i = 0; i < n; i++) {
				uint32_t addr = base + a + i;
				if (addr < size) {
					B.avr->flash[addr] = data[i];
					loaded++;
				} else {
					beyond++;
				}
			}
		} else if (t == 1) {
			break;
		} else if (t == 2 && n == 2) {
			base = ((data[0] << 8) | data[1]) << 4;
		} else if (t == 4 && n == 2) {
			base = (uint32_t)((data[0] << 8) | data[1]) << 16;
		}
	}
	fclose(f);
	if (beyond)
		event("WARN %s: %ld bytes beyond the end of flash ignored", path, beyond);
	return loaded;
}

static int load_bin(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (!f) {
		fprintf(stderr, "simboard: cannot open %s: %s\n", path, strerror(errno));
		return -1;
	}
	size_t n = fread(B.avr->flash, 1, B.avr->flashend + 1, f);
	fclose(f);
	return (int)n;
}

static void dump_flash(void)
{
	char tmp[4200];
	if (B.spi_flash && B.spi_dump_path && spiflash_dump(B.spi_dump_path) < 0)
		event("WARN SPI flash dump to %s failed: %s", B.spi_dump_path, strerror(errno));
	if (!B.dump_path) {
		event("WARN flash dump requested but no --dump path was given");
		return;
	}
	snprintf(tmp, sizeof tmp, "%s.tmp", B.dump_path);
	FILE *f = fopen(tmp, "wb");
	if (!f || fwrite(B.avr->flash, 1, B.avr->flashend + 1, f) != B.avr->flashend + 1) {
		event("WARN flash dump to %s failed: %s", tmp, strerror(errno));
		if (f)
			fclose(f);
		return;
	}
	fclose(f);
	rename(tmp, B.dump_path);
	event("DUMPED %s", B.dump_path);
}

/* ---------------------------------------------------------------- pty */

static int open_pty(void)
{
	int slave;
	struct termios t;
	if (openpty(&B.master, &slave, B.slave_name, NULL, NULL) < 0) {
		perror("simboard: openpty");
		return -1;
	}
	/* raw 8N1 at 115200 on the slave; the settings persist after we close it */
	tcgetattr(slave, &t);
	cfmakeraw(&t);
	cfsetispeed(&t, B115200);
	cfsetospeed(&t, B115200);
	t.c_cflag |= CLOCAL | CREAD;
	tcsetattr(slave, TCSANOW, &t);
	/* Closing the slave once is what makes POLLHUP report "no host has the port open". */
	close(slave);
	fcntl(B.master, F_SETFL, fcntl(B.master, F_GETFL) | O_NONBLOCK);
	if (B.port_link) {
		unlink(B.port_link);
		if (symlink(B.slave_name, B.port_link) < 0) {
			fprintf(stderr, "simboard: symlink %s: %s\n", B.port_link, strerror(errno));
			return -1;
		}
	}
	return 0;
}

/* ---------------------------------------------------------------- control (stdin) */

static void control_command(char *line)
{
	long n;
	char arg[16];
	if (sscanf(line, "drop %ld", &n) == 1 && n >= 1) {
		B.drop_in = n;
		event("CONTROL drop armed: host byte %ld from now is lost", n);
	} else if (sscanf(line, "semicolon %15s", arg) == 1) {
		B.semicolon_defect = !strcmp(arg, "on");
		event("CONTROL semicolon defect %s", B.semicolon_defect ? "on" : "off");
	} else if (!strncmp(line, "spistats", 8) && B.spi_flash) {
		char buf[256];
		spiflash_stats(buf, sizeof buf);
		event("SPISTATS %s", buf);
	} else {
		event("WARN unknown control command: %s", line);
	}
}

static void control_poll(void)
{
	static char line[256];
	static size_t len;
	struct pollfd pfd = {.fd = 0, .events = POLLIN};
	while (poll(&pfd, 1, 0) > 0) {
		if (!(pfd.revents & POLLIN)) {
			B.control = 0; /* stdin closed: nobody controls us any more */
			return;
		}
		char c;
		if (read(0, &c, 1) != 1) {
			B.control = 0;
			return;
		}
		if (c == '\n') {
			line[len] = 0;
			control_command(line);
			len = 0;
		} else if (len < sizeof line - 1) {
			line[len++] = c;
		}
	}
}

/* Host bytes onto the receive queue, through the USB-serial chip's faults. */
static void host_bytes(const uint8_t *buf, ssize_t n, avr_cycle_count_t ready)
{
	for (ssize_t i = 0; i < n; i++) {
		if (B.drop_in > 0 && --B.drop_in == 0) {
			B.drop_in = -1;
			event("FAULT host byte 0x%02x lost", buf[i]);
			continue;
		}
		q_push(&B.rxq, buf[i], ready);
		if (buf[i] == 0x3b && B.semicolon_defect)
			q_push(&B.rxq, 0xff, ready);
	}
}

/* ---------------------------------------------------------------- main */

static void usage(void)
{
	fprintf(stderr,
	        "usage: simboard --mcu atmega328p|atmega1284p|atmega2560 --boot HEX --boot-start ADDR\n"
	        "                [--app HEX] [--load-bin FILE] [--port-link PATH] [--dump FILE]\n"
	        "                [--no-auto-reset] [--latency none|fixed:<ms>|ftdi16]\n"
	        "                [--nrww ADDR] [--spm-us US] [--freq HZ] [--bootrst]\n"
	        "                [--spi-flash PORTPIN (e.g. C5)] [--spi-load FILE] [--spi-dump FILE]\n"
	        "                [--semicolon-defect] [--control]\n");
}

int main(int argc, char **argv)
{
	const char *mcu = NULL, *boot = NULL, *app = NULL, *bin = NULL, *latency = "none";
	const char *spi_flash = NULL, *spi_load = NULL;
	B.drop_in = -1;
	long freq = 16000000, spm_us = 4000;
	long boot_start = -1, nrww = -1;
	B.auto_reset = 1;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define OPT(name) (!strcmp(a, name) && v && (i++, 1))
		if (OPT("--mcu")) mcu = v;
		else if (OPT("--boot")) boot = v;
		else if (OPT("--boot-start")) boot_start = strtol(v, NULL, 0);
		else if (OPT("--app")) app = v;
		else if (OPT("--load-bin")) bin = v;
		else if (OPT("--port-link")) B.port_link = v;
		else if (OPT("--dump")) B.dump_path = v;
		else if (OPT("--latency")) latency = v;
		else if (OPT("--nrww")) nrww = strtol(v, NULL, 0);
		else if (OPT("--spm-us")) spm_us = strtol(v, NULL, 0);
		else if (OPT("--freq")) freq = strtol(v, NULL, 0);
		else if (!strcmp(a, "--no-auto-reset")) B.auto_reset = 0;
		else if (OPT("--spi-flash")) spi_flash = v;
		else if (OPT("--spi-load")) spi_load = v;
		else if (OPT("--spi-dump")) B.spi_dump_path = v;
		else if (!strcmp(a, "--bootrst")) B.bootrst = 1;
		else if (!strcmp(a, "--semicolon-defect")) B.semicolon_defect = 1;
		else if (!strcmp(a, "--control")) B.control = 1;
		else {
			usage();
			return 2;
		}
#undef OPT
	}
	if (!mcu || !boot || boot_start < 0) {
		usage();
		return 2;
	}

	avr_global_logger_set(sim_logger);
	avr_t *avr = avr_make_mcu_by_name(mcu);
	if (!avr) {
		fprintf(stderr, "simboard: unknown mcu %s\n", mcu);
		return 2;
	}
	avr_init(avr);
	avr->frequency = (uint32_t)freq;
	avr->log = LOG_WARNING;
	B.avr = avr;
	B.boot_start = (uint32_t)boot_start;
	B.nrww_start = nrww >= 0 ? (uint32_t)nrww : (uint32_t)boot_start;
	B.spm_cycles = us_to_cycles((double)spm_us);

	if (!strcmp(latency, "none")) {
		B.lat_mode = LAT_NONE;
	} else if (!strncmp(latency, "fixed:", 6)) {
		B.lat_mode = LAT_FIXED;
		B.lat_cycles = us_to_cycles(atof(latency + 6) * 1000.0);
	} else if (!strcmp(latency, "ftdi16")) {
		B.lat_mode = LAT_FTDI;
		B.lat_cycles = us_to_cycles(16000.0);
	} else {
		fprintf(stderr, "simboard: bad --latency %s\n", latency);
		return 2;
	}

	/* flash content: erased, then bootloader, then application or a raw image */
	memset(avr->flash, 0xff, avr->flashend + 1);
	if (bin && load_bin(bin) < 0)
		return 1;
	if (app && load_hex(app) < 0)
		return 1;
	if (load_hex(boot) <= 0) {
		fprintf(stderr, "simboard: bootloader %s holds no data\n", boot);
		return 1;
	}

	/* find the UART0 and flash modules and take over the parts simavr gets wrong */
	for (avr_io_t *io = avr->io_port; io; io = io->next) {
		if (!strcmp(io->kind, "uart") && ((avr_uart_t *)io)->name == '0')
			B.uart = (avr_uart_t *)io;
		if (!strcmp(io->kind, "flash"))
			B.flash = (avr_flash_t *)io;
	}
	if (!B.uart || !B.flash) {
		fprintf(stderr, "simboard: %s has no UART0 or no self-programming module\n", mcu);
		return 1;
	}
	uint32_t flags = 0; /* no poll-sleep (100x slow polling), no stdio echo */
	avr_ioctl(avr, AVR_IOCTL_UART_SET_FLAGS('0'), &flags);
	avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUTPUT),
	                        tx_hook, NULL);
	avr_register_io_write(avr, B.uart->ubrrl.reg, hook_reg_passive, NULL);
	avr_register_io_write(avr, B.uart->r_ucsra, hook_reg_passive, NULL);
	avr_register_io_write(avr, B.uart->ubrrh.reg, hook_reg_store, NULL);
	avr_register_io_write(avr, B.uart->r_ucsrc, hook_reg_store, NULL);
	B.flash_ioctl_orig = B.flash->io.ioctl;
	B.flash->io.ioctl = flash_ioctl;
	B.erased = calloc((avr->flashend + 1) / B.flash->spm_pagesize + 1, 1);
	init_erased_map();
	if (spi_flash) {
		if (strlen(spi_flash) != 2 || spi_flash[1] < '0' || spi_flash[1] > '7' ||
		    spiflash_attach(avr, spi_flash[0], spi_flash[1] - '0', event) < 0) {
			fprintf(stderr, "simboard: bad --spi-flash %s (want a port pin like C5)\n",
			        spi_flash);
			return 2;
		}
		B.spi_flash = 1;
		if (spi_load && spiflash_load(spi_load) < 0) {
			fprintf(stderr, "simboard: cannot read %s: %s\n", spi_load, strerror(errno));
			return 1;
		}
	}
	/* BOOTRST fuse: every reset (watchdog included) starts the bootloader, as on silicon */
	if (B.bootrst)
		avr->reset_pc = B.boot_start;
	B.reset_orig = avr->reset;
	avr->reset = reset_hook;
	avr->sleep = no_sleep; /* throttling is done centrally in the main loop */

	if (open_pty() < 0)
		return 1;

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGUSR2, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	/* power-on reset: MCUSR = PORF, BOOTRST fuse programmed */
	B.in_reset = 1;
	avr_reset(avr);
	B.in_reset = 0;
	avr->pc = B.boot_start;
	avr->data[MCUSR_ADDR] = 0x01;
	event("READY port=%s pty=%s mcu=%s boot=0x%05lx flash=%u page=%u", B.port_link ? B.port_link
	      : B.slave_name, B.slave_name, mcu, boot_start, avr->flashend + 1,
	      B.flash->spm_pagesize);

	double wall0 = now_us();
	avr_cycle_count_t cyc0 = avr->cycle;
	avr_cycle_count_t chunk = us_to_cycles(CHUNK_US);
	double last_lag_log = 0;
	int was_hup = 1;

	while (!sig_term) {
		if (sig_dump) {
			sig_dump = 0;
			dump_flash();
		}
		if (B.control)
			control_poll();
		if (sig_reset) {
			sig_reset = 0;
			q_clear(&B.rxq);
			external_reset("signal");
		}
		struct pollfd pfd = {.fd = B.master, .events = POLLIN};
		poll(&pfd, 1, 0);
		int hup = (pfd.revents & POLLHUP) != 0;
		if (was_hup && !hup) {
			/* a host opened the port; nothing it writes from now on is lost */
			q_clear(&B.rxq);
			q_clear(&B.txq);
			B.ftdi_len = 0;
			avr_cycle_timer_cancel(avr, rx_pump, NULL);
			B.rx_armed = 0;
			if (B.auto_reset)
				external_reset("open");
			else
				event("OPEN (no auto-reset)");
		} else if (!was_hup && hup) {
			q_clear(&B.rxq);
			event("CLOSE");
		}
		was_hup = hup;
		if (!hup && (pfd.revents & POLLIN)) {
			uint8_t buf[1024];
			/* half the room: the ';' defect may double every byte */
			int room = (QSIZE - 1 - q_len(&B.rxq)) / 2;
			if (room > (int)sizeof buf)
				room = sizeof buf;
			ssize_t n = room > 0 ? read(B.master, buf, (size_t)room) : 0;
			avr_cycle_count_t ready = avr->cycle +
			                          (B.lat_mode == LAT_FIXED ? B.lat_cycles : 0);
			host_bytes(buf, n, ready);
			rx_arm();
		}

		/* real-time throttle: run only while simulated time is behind wall time */
		double ahead = (double)(avr->cycle - cyc0) * 1e6 / avr->frequency - (now_us() - wall0);
		if (ahead > 0) {
			struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)(ahead * 1000)};
			int room = !q_full(&B.rxq);
			if (!hup && room)
				ppoll(&pfd, 1, &ts, NULL); /* wake early when the host writes */
			else
				nanosleep(&ts, NULL);
			continue;
		}
		if (ahead < -LAG_REBASE_US) {
			double t = now_us();
			if (t - last_lag_log > 1e6) {
				event("LAG simulation fell %.1f ms behind real time; re-basing", -ahead / 1000);
				last_lag_log = t;
			}
			wall0 = t;
			cyc0 = avr->cycle;
		}

		avr_cycle_count_t end = avr->cycle + chunk;
		while (avr->cycle < end) {
			int st = avr_run(avr);
			if (st == cpu_Done || st == cpu_Crashed) {
				if (!B.stopped_logged) {
					event("STOPPED cpu %s at pc=0x%05x; waiting for a reset",
					      st == cpu_Done ? "halted" : "crashed", avr->pc);
					B.stopped_logged = 1;
				}
				avr->cycle = end;
				break;
			}
		}
		tx_release(hup);
	}
	if (B.port_link)
		unlink(B.port_link);
	event("EXIT");
	return 0;
}
