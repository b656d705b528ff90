/*
 * Flasher test firmware: the application we flash onto simulated boards. It proves that a
 * flash really landed (it checks a CRC over its own image, stored by the build right after
 * the image) and behaves enough like a printer firmware for OctoPrint to reach Operational.
 *
 * Build parameters (-D): FW_NAME (string), BAUD_RATE, F_CPU. The build also supplies
 * PAD_FILE, deterministic pseudo-random bytes that give the image an exact size and make
 * every page differ.
 *
 * Output at boot:  "start", "echo: Flasher Test Firmware <NAME>", then "ok crc" or "bad crc".
 * Commands (optionally "N<n> ... *<cs>" as OctoPrint sends them):
 *   M115 -> "FIRMWARE_NAME:Flasher Test Firmware <NAME> ..." + "ok"
 *   M105 -> "ok T:21.0 /0.0 B:21.0 /0.0"
 *   anything else -> "ok"
 *
 * Einsy builds (-DXFLASH_MODE=1|2|3, ATmega2560) model how the Prusa MK3 firmware starts
 * (research/prusa.md §1.6): 1 = v3.10+: if the SPI flash (W25X20CL, /CS on PC5) answers the
 * 0x90 id with EF 11 (or GD25Q20C's C8 11), flush the input, print "start", and for 1.75 s
 * wait for "w25x20cl_enter\n"; on it answer "w25x20cl_cfm\n" and serve the language-flash
 * handler below until it reboots through the watchdog; a wrong byte or the timeout boots
 * normally (no second "start"). 2 = firmware without the handler (before 3.3): "start" and a
 * normal boot. 3 = stuck at the splash screen (3.9.x, PF #2954): never prints "start".
 * LANG_SIGNATURE (-D) is stored in flash as the firmware's _PRI_LANG_SIGNATURE would be.
 */
#include <avr/interrupt.h>
#include <avr/io.h>
#include <avr/pgmspace.h>
#include <avr/wdt.h>
#include <stdint.h>
#include <string.h>
#include <util/crc16.h>
#include <util/delay.h>

#ifndef FW_NAME
#error "FW_NAME must be defined"
#endif
#ifndef BAUD_RATE
#define BAUD_RATE 115200
#endif
#define STR_(x) #x
#define STR(x) STR_(x)

/* Padding in flash, read only through far pointers (it may end above 64 KiB). */
__asm__(".section .progmem.pad,\"a\",@progbits\n"
        ".global fw_pad\n"
        "fw_pad:\n"
        ".incbin \"" PAD_FILE "\"\n"
        ".global fw_pad_end\n"
        "fw_pad_end:\n"
        ".text\n");
extern const uint8_t fw_pad[] PROGMEM;
extern const uint8_t fw_pad_end[] PROGMEM;
/* End of the image in flash: the build stores the CRC-16/XMODEM of [0, end) right here. */
extern const uint8_t __data_load_end[];

#ifdef RAMPZ /* flash above 64 KiB: ELPM and 32-bit addresses */
#define FLASH_ADDR(sym) pgm_get_far_address(sym)
#define FLASH_READ(a) pgm_read_byte_far(a)
#else
#define FLASH_ADDR(sym) ((uint32_t)(uint16_t)(sym))
#define FLASH_READ(a) pgm_read_byte((uint16_t)(a))
#endif
#ifndef USART0_RX_vect
#define USART0_RX_vect USART_RX_vect /* the m328p names its only USART without a number */
#endif

/* Interrupt-driven receive so a busy main loop never drops host input. */
static volatile uint8_t rx_buf[256];
static volatile uint8_t rx_head, rx_tail;

ISR(USART0_RX_vect)
{
	uint8_t c = UDR0;
	uint8_t next = (uint8_t)(rx_head + 1);
	if (next != rx_tail) {
		rx_buf[rx_head] = c;
		rx_head = next;
	}
}

static void uart_init(void)
{
	/* same divisor as optiboot: U2X, rounded */
	uint16_t ubrr = (uint16_t)((F_CPU + BAUD_RATE * 4UL) / (BAUD_RATE * 8UL) - 1);
	UCSR0A = _BV(U2X0);
	UBRR0H = (uint8_t)(ubrr >> 8);
	UBRR0L = (uint8_t)ubrr;
	UCSR0C = _BV(UCSZ01) | _BV(UCSZ00);
	UCSR0B = _BV(RXEN0) | _BV(TXEN0) | _BV(RXCIE0);
}

static void putch(char c)
{
	while (!(UCSR0A & _BV(UDRE0)))
		;
	UDR0 = (uint8_t)c;
}

static void puts_(const char *s)
{
	while (*s)
		putch(*s++);
}

static void line(const char *s)
{
	puts_(s);
	putch('\n');
}

static int getch(void)
{
	if (rx_head == rx_tail)
		return -1;
	uint8_t c = rx_buf[rx_tail];
	rx_tail = (uint8_t)(rx_tail + 1);
	return c;
}

#ifdef XFLASH_MODE
#ifndef LANG_SIGNATURE
#define LANG_SIGNATURE 0UL
#endif
const uint32_t lang_signature PROGMEM __attribute__((used)) = LANG_SIGNATURE;
#endif

static uint8_t crc_ok(void)
{
	uint32_t end = FLASH_ADDR(__data_load_end);
	uint16_t crc = 0;
	for (uint32_t a = 0; a < end; a++)
		crc = _crc_xmodem_update(crc, FLASH_READ(a));
	uint16_t stored = FLASH_READ(end) | (FLASH_READ(end + 1) << 8);
	/* touch the padding so nothing can drop it */
	uint32_t pad = FLASH_ADDR(fw_pad);
	return crc == stored && FLASH_ADDR(fw_pad_end) >= pad;
}

/* Strip "N<n> " and "*<cs>", which OctoPrint adds; we only acknowledge. */
static char *command_of(char *s)
{
	char *star = strchr(s, '*');
	if (star)
		*star = 0;
	while (*s == ' ')
		s++;
	if (*s == 'N') {
		s++;
		while (*s >= '0' && *s <= '9')
			s++;
		while (*s == ' ')
			s++;
	}
	return s;
}

static void handle(char *buf)
{
	char *cmd = command_of(buf);
	if (!strncmp(cmd, "M115", 4) && (cmd[4] == 0 || cmd[4] == ' ')) {
		line("FIRMWARE_NAME:Flasher Test Firmware " FW_NAME
		     " SOURCE_CODE_URL:https://example.invalid/octoprint-flasher PROTOCOL_VERSION:1.0"
		     " MACHINE_TYPE:simboard EXTRUDER_COUNT:1");
		line("ok");
	} else if (!strncmp(cmd, "M105", 4) && (cmd[4] == 0 || cmd[4] == ' ')) {
		line("ok T:21.0 /0.0 B:21.0 /0.0");
	} else {
		line("ok");
	}
}

#if defined(XFLASH_MODE) && XFLASH_MODE == 1
/* ------------------------------------------------ the Einsy's SPI flash and its handler */
#define XF_CS_LOW() (PORTC &= (uint8_t)~_BV(PC5))
#define XF_CS_HIGH() (PORTC |= _BV(PC5))

static void spi_init(void)
{
	PORTC |= _BV(PC5); /* /CS idle high, then drive it */
	DDRC |= _BV(PC5);
	DDRB |= _BV(PB0) | _BV(PB1) | _BV(PB2); /* SS (kept output for master mode), SCK, MOSI */
	SPCR = _BV(SPE) | _BV(MSTR);              /* mode 0, fosc/4 */
	SPSR = 0;
}

static uint8_t spi_xfer(uint8_t b)
{
	SPDR = b;
	while (!(SPSR & _BV(SPIF)))
		;
	return SPDR;
}

static void xf_cmd_addr(uint8_t cmd, uint32_t addr)
{
	XF_CS_LOW();
	spi_xfer(cmd);
	spi_xfer((uint8_t)(addr >> 16));
	spi_xfer((uint8_t)(addr >> 8));
	spi_xfer((uint8_t)addr);
}

static void xf_simple(uint8_t cmd)
{
	XF_CS_LOW();
	spi_xfer(cmd);
	XF_CS_HIGH();
}

static void xf_wait_busy(void)
{
	XF_CS_LOW();
	spi_xfer(0x05);
	while (spi_xfer(0) & 0x01)
		;
	XF_CS_HIGH();
}

static uint8_t xf_id_ok(void)
{
	xf_cmd_addr(0x90, 0);
	uint8_t mfr = spi_xfer(0), dev = spi_xfer(0);
	XF_CS_HIGH();
	return (mfr == 0xEF || mfr == 0xC8) && dev == 0x11;
}

static void reboot(void)
{
	while (!(UCSR0A & _BV(TXC0)) || !(UCSR0A & _BV(UDRE0)))
		;
	wdt_enable(WDTO_15MS);
	for (;;)
		;
}

static uint8_t getch_poll(void)
{
	while (!(UCSR0A & _BV(RXC0)))
		;
	return UDR0;
}

static void get_n(uint8_t n)
{
	while (n--)
		getch_poll();
}

/* The end-of-packet byte: 0x20 answers INSYNC, anything else 0x11 and a watchdog reboot. */
static void verify_space(void)
{
	if (getch_poll() != 0x20) {
		putch(0x11);
		reboot();
	}
	putch(0x14);
}

/* Nibble-split 16-bit value: the device ORs each pair back (bytes never hold 0x3B). */
static uint16_t get_split(uint8_t high_first)
{
	uint8_t a = getch_poll(), b = getch_poll(), c = getch_poll(), d = getch_poll();
	uint16_t first = a | b, second = c | d;
	return high_first ? (uint16_t)(first << 8 | second) : (uint16_t)(second << 8 | first);
}

static uint8_t page_buf[256];

static void xflash_handler(void)
{
	uint16_t word = 0;
	uint8_t ext = 0, erased = 0;
	for (;;) {
		uint8_t ch = getch_poll();
		if (ch == 0x41) { /* GET_PARAMETER */
			uint8_t which = getch_poll();
			verify_space();
			putch(which == 0x81 ? 6 : which == 0x82 ? 2 : 3);
		} else if (ch == 0x42) { /* SET_DEVICE: ignored */
			get_n(20);
			verify_space();
		} else if (ch == 0x45) { /* SET_DEVICE_EXT: ignored */
			get_n(5);
			verify_space();
		} else if (ch == 0x55) { /* LOAD_ADDRESS, word address, lo&0F lo&F0 hi&0F hi&F0 */
			word = get_split(0);
			verify_space();
		} else if (ch == 0x56) { /* UNIVERSAL: only 0x4D (extended address) does anything */
			if (getch_poll() == 0x4D) {
				getch_poll();
				ext = getch_poll();
				getch_poll();
			} else {
				get_n(3);
			}
			verify_space();
			putch(0x00);
		} else if (ch == 0x64 || ch == 0x74) { /* PROG_PAGE / READ_PAGE */
			uint16_t len = get_split(1);
			uint8_t type = getch_poll();
			uint32_t addr = (uint32_t)ext << 17 | (uint32_t)word << 1;
			if (ch == 0x64) {
				for (uint16_t i = 0; i < len; i++) {
					uint8_t b = getch_poll();
					if (i < sizeof page_buf)
						page_buf[i] = b;
				}
				verify_space();
				if (type == 'E')
					for (;;) /* EEPROM: Prusa's handler hangs here (watchdog off) */
						;
				if (len > sizeof page_buf)
					len = sizeof page_buf;
				uint8_t block = (uint8_t)(addr >> 16);
				if ((addr & 0xFFFF) == 0 && !(erased & (1 << block))) {
					xf_wait_busy(); /* a 64 KB block is erased when its first page comes */
					xf_simple(0x06);
					xf_cmd_addr(0xD8, addr);
					XF_CS_HIGH();
					erased |= (uint8_t)(1 << block);
				}
				xf_wait_busy();
				xf_simple(0x06);
				xf_cmd_addr(0x02, addr);
				for (uint16_t i = 0; i < len; i++)
					spi_xfer(page_buf[i]);
				XF_CS_HIGH();
				xf_wait_busy();
				xf_simple(0x04);
			} else {
				verify_space();
				xf_wait_busy();
				xf_cmd_addr(0x03, addr);
				for (uint16_t i = 0; i < len; i++)
					putch((char)spi_xfer(0));
				XF_CS_HIGH();
			}
		} else if (ch == 0x75) { /* READ_SIGN: the 2560's, not the flash's */
			verify_space();
			putch(0x1E);
			putch(0x98);
			putch(0x01);
		} else if (ch == 0x51) { /* LEAVE_PROGMODE: reboot through the watchdog */
			verify_space();
			putch(0x10);
			reboot();
		} else { /* GET_SYNC, ENTER_PROGMODE, anything else */
			verify_space();
		}
		putch(0x10);
	}
}

/* "start", then up to 1.75 s (Timer1, clk/1024) for the magic from the receive ring. */
static uint8_t xflash_handshake(void)
{
	static const char magic[] = "w25x20cl_enter\n";
	uint8_t got = 0;
	_delay_ms(2);
	rx_tail = rx_head; /* flush what came before */
	line("start");
	TCNT1 = 0;
	TCCR1B = _BV(CS12) | _BV(CS10);
	while (magic[got]) {
		int c = getch();
		if (c < 0) {
			if (TCNT1 >= (uint16_t)(1.75 * F_CPU / 1024)) {
				got = 0;
				break;
			}
			continue;
		}
		if (c != magic[got]) {
			got = 0;
			break;
		}
		got++;
	}
	TCCR1B = 0;
	TCNT1 = 0;
	if (!got)
		return 0;
	UCSR0B &= (uint8_t)~_BV(RXCIE0); /* the handler polls the UART itself */
	puts_("w25x20cl_cfm\n");
	return 1;
}
#endif

int main(void)
{
	MCUSR = 0;
	wdt_disable(); /* a bootloader may leave through a watchdog reset */
	uart_init();
	sei();
#if defined(XFLASH_MODE) && XFLASH_MODE == 1
	spi_init();
	if (xf_id_ok()) {
		if (xflash_handshake())
			xflash_handler();
	} else {
		line("start");
	}
#elif defined(XFLASH_MODE) && XFLASH_MODE == 3
	for (;;) /* stuck at the splash screen */
		;
#else
	line("start");
#endif
	line("echo: Flasher Test Firmware " FW_NAME);
	line(crc_ok() ? "ok crc" : "bad crc");

	char buf[96];
	uint8_t len = 0;
	for (;;) {
		int c = getch();
		if (c < 0)
			continue;
		if (c == '\n' || c == '\r') {
			buf[len] = 0;
			if (len)
				handle(buf);
			len = 0;
		} else if (len < sizeof buf - 1) {
			buf[len++] = (char)c;
		}
	}
}
