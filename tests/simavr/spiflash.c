/*
 * spiflash: a Winbond W25X20CL (2 Mbit = 256 KiB SPI NOR flash, the Einsy RAMBo's "XFLASH")
 * on the simulated AVR's SPI master, selected by one port pin (the Einsy's PC5).
 *
 * Why it is built like this (research/prusa.md §1.4-1.6, §5.2):
 *  - simavr 1.6 completes every SPI byte 100 µs after the SPDR write, whatever the clock
 *    divider: 200x slower than the Einsy's fosc/4. We take over the SPDR write and finish the
 *    byte after 8 SPI clocks (SPR1:0 and SPI2X), so a 256-byte page costs what it does on the
 *    board. simavr's own SPDR read (returns the received byte, clears SPIF) is kept.
 *  - the chip as the datasheet describes it: commands start on /CS low and act on /CS high;
 *    program and erase need the write-enable latch and clear it when they finish; page program
 *    wraps inside its 256-byte page and can only clear bits (AND); erase sets 4 KiB / 32 KiB /
 *    64 KiB / the whole chip to 0xFF; while BUSY every instruction but Read Status is ignored.
 *  - busy times are the datasheet's typical figures (tPP 0.8 ms, tSE 30 ms, tBE1 120 ms,
 *    tBE2 150 ms, tCE 1 s) on the simulated clock.
 * Counters (programs, erases, stale programs = a program that needed a 1 where a 0 was) are
 * reported on request, so tests can pin the 64 KiB erase rule from outside.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <simavr/avr_ioport.h>
#include <simavr/avr_spi.h>
#include <simavr/sim_avr.h>
#include <simavr/sim_cycle_timers.h>
#include <simavr/sim_interrupts.h>
#include <simavr/sim_io.h>
#include <simavr/sim_irq.h>

#include "spiflash.h"

#define SF_SIZE 0x40000u
#define SF_PAGE 256u

enum {
	SR_BUSY = 0x01,
	SR_WEL = 0x02,
};

static struct {
	avr_t *avr;
	avr_spi_t *spi;
	uint8_t mem[SF_SIZE];
	int selected;          /* /CS low */
	unsigned pos;          /* byte index inside the current /CS-low transaction */
	uint8_t cmd;
	uint32_t addr;
	uint8_t page[SF_PAGE]; /* page program buffer */
	uint8_t page_set[SF_PAGE];
	int wel;
	avr_cycle_count_t busy_until;
	uint8_t mosi;          /* byte being shifted out by the AVR */
	unsigned long programs, erases4k, erases32k, erases64k, chip_erases, stale, ignored_busy;
	void (*event)(const char *fmt, ...);
} F;

static avr_cycle_count_t ms_to_cycles(double ms)
{
	return (avr_cycle_count_t)(ms * F.avr->frequency / 1000.0);
}

static int busy(void) { return F.avr->cycle < F.busy_until; }

static void start_busy(double ms)
{
	F.busy_until = F.avr->cycle + ms_to_cycles(ms);
	F.wel = 0; /* the latch clears when the operation completes; reads show BUSY until then */
}

static uint8_t status(void) { return busy() ? (SR_BUSY | SR_WEL) : (F.wel ? SR_WEL : 0); }

/* One byte in from MOSI, the byte the chip drives on MISO at the same time back. */
static uint8_t xfer(uint8_t in)
{
	unsigned i = F.pos++;
	if (i == 0) {
		F.cmd = in;
		F.addr = 0;
		memset(F.page_set, 0, sizeof F.page_set);
		if (busy() && in != 0x05) {
			F.cmd = 0; /* ignored while BUSY */
			F.ignored_busy++;
		}
		return 0xff;
	}
	switch (F.cmd) {
	case 0x05: /* read status register 1, repeated while /CS stays low */
		return status();
	case 0x03: /* read data */
	case 0x0b: /* fast read: one dummy byte after the address */
		if (i <= 3) {
			F.addr = (F.addr << 8 | in) % SF_SIZE;
			return 0xff;
		}
		if (F.cmd == 0x0b && i == 4)
			return 0xff;
		{
			uint8_t v = F.mem[F.addr];
			F.addr = (F.addr + 1) % SF_SIZE;
			return v;
		}
	case 0x02: /* page program: address, then up to 256 bytes wrapping inside the page */
		if (i <= 3) {
			F.addr = (F.addr << 8 | in) % SF_SIZE;
			return 0xff;
		}
		{
			unsigned off = (F.addr + (i - 4)) % SF_PAGE;
			F.page[off] = in;
			F.page_set[off] = 1;
		}
		return 0xff;
	case 0x20: case 0x52: case 0xd8: /* erases take a 3-byte address */
		if (i <= 3)
			F.addr = (F.addr << 8 | in) % SF_SIZE;
		return 0xff;
	case 0x90: /* manufacturer / device id after 3 address bytes; A0 picks the order */
		if (i <= 3) {
			F.addr = F.addr << 8 | in;
			return 0xff;
		}
		return ((i - 4) ^ (F.addr & 1)) & 1 ? 0x11 : 0xef;
	case 0x9f: /* JEDEC id: Winbond, memory type, capacity (2 Mbit) */
		return (const uint8_t[]){0xef, 0x30, 0x12}[(i - 1) % 3];
	case 0xab: /* release power-down / device id after 3 dummy bytes */
		return i <= 3 ? 0xff : 0x11;
	case 0x4b: /* unique id after 4 dummy bytes */
		return i <= 4 ? 0xff : (uint8_t)(0xd0 + (i - 5) % 8);
	default:
		return 0xff;
	}
}

static void erase(uint32_t size, double ms, unsigned long *count)
{
	uint32_t start = F.addr & ~(size - 1);
	memset(F.mem + start, 0xff, size);
	(*count)++;
	start_busy(ms);
}

/* /CS high: the instruction takes effect (datasheet: program and erase need exactly the
 * bytes of their instruction before /CS goes high, else they are not executed). */
static void deselect(void)
{
	unsigned n = F.pos;
	F.pos = 0;
	if (n == 0 || busy())
		return;
	switch (F.cmd) {
	case 0x06:
		if (n == 1)
			F.wel = 1;
		break;
	case 0x04:
		if (n == 1)
			F.wel = 0;
		break;
	case 0x02:
		if (F.wel && n >= 5) {
			uint32_t base = F.addr & ~(SF_PAGE - 1);
			int stale = 0;
			for (unsigned k = 0; k < SF_PAGE; k++) {
				if (!F.page_set[k])
					continue;
				uint8_t old = F.mem[base + k];
				if (F.page[k] & ~old)
					stale = 1;
				F.mem[base + k] = old & F.page[k];
			}
			F.programs++;
			F.stale += stale;
			start_busy(0.8);
		}
		break;
	case 0x20:
		if (F.wel && n == 4)
			erase(0x1000, 30, &F.erases4k);
		break;
	case 0x52:
		if (F.wel && n == 4)
			erase(0x8000, 120, &F.erases32k);
		break;
	case 0xd8:
		if (F.wel && n == 4)
			erase(0x10000, 150, &F.erases64k);
		break;
	case 0xc7: case 0x60:
		if (F.wel && n == 1) {
			memset(F.mem, 0xff, SF_SIZE);
			F.chip_erases++;
			start_busy(1000);
		}
		break;
	default:
		break;
	}
}

static void cs_hook(struct avr_irq_t *irq, uint32_t value, void *param)
{
	(void)irq; (void)param;
	int sel = value == 0;
	if (sel && !F.selected)
		F.pos = 0;
	else if (!sel && F.selected)
		deselect();
	F.selected = sel;
}

static avr_cycle_count_t spi_done(avr_t *avr, avr_cycle_count_t when, void *param)
{
	(void)when; (void)param;
	F.spi->input_data_register = F.selected ? xfer(F.mosi) : 0xff;
	avr_raise_interrupt(avr, &F.spi->spi);
	return 0;
}

/* SPDR write: as the silicon, start shifting; SPIF rises after 8 SPI clocks. */
static void spdr_write(avr_t *avr, avr_io_addr_t addr, uint8_t v, void *param)
{
	(void)param;
	avr_spi_t *p = F.spi;
	avr_regbit_clear(avr, p->spi.raised);
	avr->data[addr] = v;
	if (!avr_regbit_get(avr, p->spe) || !avr_regbit_get(avr, p->mstr))
		return;
	static const int div[4] = {4, 16, 64, 128};
	int d = div[avr_regbit_get(avr, p->spr[0]) | avr_regbit_get(avr, p->spr[1]) << 1];
	if (avr_regbit_get(avr, p->spr[2]))
		d /= 2;
	F.mosi = v;
	avr_cycle_timer_cancel(avr, spi_done, NULL);
	avr_cycle_timer_register(avr, (avr_cycle_count_t)(8 * d), spi_done, NULL);
}

int spiflash_attach(avr_t *avr, char cs_port, int cs_pin, void (*event)(const char *fmt, ...))
{
	F.avr = avr;
	F.event = event;
	memset(F.mem, 0xff, sizeof F.mem);
	for (avr_io_t *io = avr->io_port; io; io = io->next)
		if (!strcmp(io->kind, "spi"))
			F.spi = (avr_spi_t *)io;
	if (!F.spi) {
		fprintf(stderr, "simboard: this mcu has no SPI module for the SPI flash\n");
		return -1;
	}
	/* replace simavr's SPDR write (100 µs per byte) with ours; its read stays */
	avr->io[AVR_DATA_TO_IO(F.spi->r_spdr)].w.c = spdr_write;
	avr->io[AVR_DATA_TO_IO(F.spi->r_spdr)].w.param = NULL;
	avr_irq_t *cs = avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ(cs_port), cs_pin);
	if (!cs) {
		fprintf(stderr, "simboard: no port %c pin %d for the SPI flash /CS\n", cs_port, cs_pin);
		return -1;
	}
	avr_irq_register_notify(cs, cs_hook, NULL);
	return 0;
}

void spiflash_mcu_reset(void)
{
	/* the AVR's pins float after a reset: the chip sees /CS high (pull-up), the transfer
	 * in progress is lost; an erase or program already started runs to its end */
	if (F.selected)
		deselect();
	F.selected = 0;
	F.pos = 0;
}

int spiflash_load(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return -1;
	size_t n = fread(F.mem, 1, SF_SIZE, f);
	fclose(f);
	return (int)n;
}

int spiflash_dump(const char *path)
{
	char tmp[4200];
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	FILE *f = fopen(tmp, "wb");
	if (!f)
		return -1;
	size_t n = fwrite(F.mem, 1, SF_SIZE, f);
	fclose(f);
	if (n != SF_SIZE)
		return -1;
	return rename(tmp, path);
}

void spiflash_stats(char *buf, size_t n)
{
	snprintf(buf, n,
	         "programs=%lu erase4k=%lu erase32k=%lu erase64k=%lu chip_erase=%lu stale=%lu "
	         "ignored_busy=%lu",
	         F.programs, F.erases4k, F.erases32k, F.erases64k, F.chip_erases, F.stale,
	         F.ignored_busy);
}
