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
 */
#include <avr/interrupt.h>
#include <avr/io.h>
#include <avr/pgmspace.h>
#include <avr/wdt.h>
#include <stdint.h>
#include <string.h>
#include <util/crc16.h>

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

int main(void)
{
	MCUSR = 0;
	wdt_disable(); /* a bootloader may leave through a watchdog reset */
	uart_init();
	sei();
	line("start");
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
