"""How bytes reach a board: serial ports, USB devices, CAN buses, reset lines, entering bootloaders,
and what their failures mean."""
