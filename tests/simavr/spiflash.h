/* spiflash: the W25X20CL SPI NOR flash model of simboard (see spiflash.c). */
#ifndef SIMBOARD_SPIFLASH_H
#define SIMBOARD_SPIFLASH_H

#include <stddef.h>

#include <simavr/sim_avr.h>

int spiflash_attach(avr_t *avr, char cs_port, int cs_pin, void (*event)(const char *fmt, ...));
void spiflash_mcu_reset(void);
int spiflash_load(const char *path);
int spiflash_dump(const char *path);
void spiflash_stats(char *buf, size_t n);

#endif
